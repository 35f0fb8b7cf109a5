"""Supervised fine-tuning against TRL's SFTTrainer on the same tiny model, tokenizer and records: the token ids
and assistant masks its dataset preparation makes, and its loss and mean_token_accuracy on one batch.

Tolerance: loss within 1e-5 relative (float32 on both sides); token accuracy equal.
"""

import json

import jax
import pytest

from jaxllm import from_hf
from jaxllm.config import DataConfig, ObjectiveConfig, SourceConfig
from jaxllm.data.chat import ChatEncoder
from jaxllm.data.chat_template import load_chat_template
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.train.losses import normalizers, sft_loss
from tests.data.test_chat import SYSTEM, TURNS, _template, _write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

RECORDS = [
    {"messages": [SYSTEM, *TURNS]},
    {"messages": TURNS[:2]},
    {"messages": [TURNS[2], TURNS[3]]},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tokenizer with a ChatML template carrying {% generation %} marks (what TRL's assistant_only_loss needs),
    and a tiny random Llama saved beside it."""
    root = tmp_path_factory.mktemp("sft")
    directory = _write_tokenizer(root / "model", "bytelevel", None, "<|im_end|>", _template("chatml_generation"),
                                 "jinja")  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80,
                                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def _trainer(directory, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, packing=False,
                         per_device_train_batch_size=len(RECORDS), max_length=None, report_to=[], use_cpu=True,
                         bf16=False, fp16=False)  # fmt: skip
    data = datasets.Dataset.from_list(RECORDS)
    return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def test_data_loss_and_accuracy_match_trl(hf_dir, tmp_path):
    trainer = _trainer(hf_dir, tmp_path)
    tokenizer = load_tokenizer(str(hf_dir))
    encoder = ChatEncoder(tokenizer, load_chat_template(str(hf_dir)))
    prepared = trainer.train_dataset
    for i, record in enumerate(RECORDS):
        ids, mask = encoder.encode(record)
        assert ids == prepared[i]["input_ids"]
        assert mask == [int(label != -100) for label in prepared[i]["labels"]]  # TRL folds the mask into labels

    # TRL's loss on one padded batch of the three conversations.
    batch = trainer.data_collator([prepared[i] for i in range(len(RECORDS))])
    trainer.model.train(False)
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    trl_accuracy = trainer._metrics["eval"]["mean_token_accuracy"][-1]  # eval mode: no dropout

    # Ours: the same records through the sft pipeline (packed rows of one batch), the same weights.
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], seq_len=128, shuffle_window=0, prefetch=0,
                     add_bos=False, objective=ObjectiveConfig(name="sft"))  # fmt: skip
    pipeline = make_pipeline(cfg, tokenizer, 2, num_epochs=1)
    rows = list(pipeline)
    pipeline.close()
    assert len(rows) == 1 and sum(len(set(r.tolist()) - {0}) for r in rows[0]["segment_ids"]) == 3
    model = from_hf(hf_dir, devices=jax.devices()[:1])
    row = {k: jax.numpy.asarray(v) for k, v in rows[0].items()}
    loss, metrics = sft_loss(model.params, model.graphdef, row, normalizers(row), 0.0, 0)
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5)
    assert float(metrics["mean_token_accuracy"]) == pytest.approx(trl_accuracy, abs=1e-6)
    assert int(normalizers(row)["examples"]) == 3


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
def test_lora_and_qlora_fine_tuning_from_a_hugging_face_directory(hf_dir, tmp_path, quant, capsys):
    """train.init_from a Hugging Face directory: its architecture, tokenizer and chat template are used, the
    held-out loss falls, evaluation reports token accuracy and exact match, and the run keeps the template."""
    from jaxllm.config import load_config
    from jaxllm.train.checkpoint import find_checkpoint
    from jaxllm.train.loop import Trainer

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 4))
    overrides = [f"run_dir={tmp_path / 'run'}", f"train.init_from={hf_dir}", "data.objective.name=sft",
                 f"data.sources=[{{path: {path}}}]", f"eval.sources=[{{path: {path}}}]", "data.seq_len=128",
                 "data.add_bos=false", "train.steps=4", "train.batch_size=2", "train.log_every=2",
                 "train.sample_prompt=null", "train.progress_bar=false", "optim.lr=5e-3", "optim.warmup_steps=0",
                 "model.lora.rank=4", "model.lora.targets=attn/(q|v)$", "checkpoint.every=100",
                 "mesh.data=1", "mesh.fsdp=2"]  # fmt: skip
    if quant:
        overrides += ["model.quant.kind=nf4", "model.quant.block_size=16"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, devices=jax.devices()[:2])
    try:
        assert trainer.cfg.model.family == "llama" and trainer.cfg.model.d_model == 48
        before = trainer.evaluate()
        summary = trainer.run()
        after = trainer.evaluate()
    finally:
        trainer.close()
    assert summary["end_step"] == 4 and after["eval_loss"] < before["eval_loss"]
    assert 0.0 <= after["eval_mean_token_accuracy"] <= 1.0 and 0.0 <= after["eval_exact_match"] <= 1.0
    checkpointer, step = find_checkpoint(tmp_path / "run")
    files = checkpointer.restore_meta(step, with_data=False).tokenizer_files
    assert files["chat_template.jinja"].decode() == _template("chatml_generation")
    if not quant:  # the fine-tuned model answers a chat prompt rendered with that template
        from jaxllm.cli import main

        capture = capsys.readouterr()
        assert main(["generate", "--run-dir", str(tmp_path / "run"), "--chat", "--prompt", "What is 2+2?",
                     "--max-new-tokens", "6", "--temperature", "0"]) == 0
        prompt, reply = capsys.readouterr().out.splitlines()[:2]
        assert prompt == "What is 2+2?" and reply.startswith("> ")
        del capture
