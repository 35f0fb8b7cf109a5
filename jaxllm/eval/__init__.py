"""Evaluation: lm-evaluation-harness tasks scored by jaxllm models (`harness.JaxLM`, `tasks.run_tasks`), and
the perplexity of text sources (`perplexity`)."""
