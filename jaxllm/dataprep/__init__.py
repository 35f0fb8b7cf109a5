"""Data preparation offline, at scale (docs/data.md): per-document stages (clean, decontaminate) and dedup over a
corpus of jsonl/parquet/text shards, on all cores of one machine (engine.py) or as Apache Beam pipelines
(beam.py), chained by `jaxllm data prepare` (prepare.py); tokenised ArrayRecord shards for training (shards.py).
`jaxllm.data` stays the training input pipeline; this package reads its inputs with jaxllm.data.readers (io.py).
"""
