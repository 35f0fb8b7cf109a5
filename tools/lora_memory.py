"""Memory of LoRA and QLoRA: the frozen base in bfloat16 vs NF4 / int8, the adapters, and the optimizer
state of LoRA vs full fine-tuning.

    python tools/lora_memory.py configs/qwen2-0.5b.yaml --materialize   # real arrays, summed nbytes
    python tools/lora_memory.py configs/mistral-7b.yaml                 # shapes only (same bytes)

"Projections" are the kernels the policy quantises (attention, MLPs, experts); the rest (embeddings,
output head, norms, routers) stays in the checkpoint's dtype. The optimizer is this config's (AdamW:
two moments per trainable value, in the trainable values' dtype).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax

from jaxllm import models, sharding
from jaxllm.config import LoraConfig, MeshConfig, QuantConfig, load_config
from jaxllm.models import lora
from jaxllm.train.optim import make_optimizer

VARIANTS = {"bf16": None, "int8": QuantConfig("int8"), "nf4": QuantConfig("nf4"),
            "nf4 + double quant": QuantConfig("nf4", double_quant=True)}


def nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def split_projections(params, cfg):
    """(bytes of the projection kernels, bytes of everything else) of a model's parameters. The kernels
    are those the quantisation policy selects (models/lora.py), found by quantising an abstract copy."""
    base = lora.base_config(cfg)
    abstract = models.model_spec(dataclasses.replace(base, quant=QuantConfig("int8")))[1]
    marks = jax.tree_util.tree_map_with_path(lambda path, a: path[-1].key == "codes", abstract)
    kernels = {tuple(str(getattr(p, "key", p)) for p in path[:-1])
               for path, is_codes in jax.tree_util.tree_flatten_with_path(marks)[0] if is_codes}
    proj = other = 0
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        size = a.size * a.dtype.itemsize
        if keys[:-1] in kernels or keys in kernels:
            proj += size
        else:
            other += size
    return proj, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--materialize", action="store_true", help="allocate the parameters and sum their nbytes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    base = dataclasses.replace(cfg.model, param_dtype="bfloat16", lora=None, quant=None)
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.make_rules()
    print(f"{args.config}: {'real arrays' if args.materialize else 'shapes'}; LoRA rank {args.rank} on every projection")
    print("| base stored as | projection kernels | rest of the model | total | kernels vs bf16 |\n|---|---|---|---|---|")
    reference = None
    for name, quant in VARIANTS.items():
        model_cfg = dataclasses.replace(base, quant=quant)
        if args.materialize:
            params = models.init_params(model_cfg, mesh, rules, seed=0)[1]
        else:
            params = models.model_spec(model_cfg)[1]
        proj, other = split_projections(params, model_cfg)
        reference = reference or proj
        print(f"| {name} | {proj / 2**20:,.1f} MiB | {other / 2**20:,.1f} MiB | {(proj + other) / 2**20:,.1f} MiB "
              f"| {reference / proj:.2f}x smaller |")
        del params
    adapted = dataclasses.replace(base, lora=LoraConfig(rank=args.rank, targets="attn/(q|k|v|o)$|mlp/(gate|up|down)$"))
    abstract = models.model_spec(adapted)[1]
    tx = make_optimizer(cfg.optim, 10)
    adapters = lora.trainable(abstract)
    lora_state = nbytes(jax.eval_shape(tx.init, adapters))
    full_state = nbytes(jax.eval_shape(tx.init, models.model_spec(base)[1]))
    print(f"\nadapters: {nbytes(adapters) / 2**20:,.1f} MiB (float32); optimizer state ({cfg.optim.name}): "
          f"LoRA {lora_state / 2**20:,.1f} MiB vs full fine-tuning {full_state / 2**20:,.1f} MiB "
          f"({full_state / lora_state:,.0f}x); LoRA state / adapter bytes = {lora_state / nbytes(adapters):.3f}")


if __name__ == "__main__":
    main()
