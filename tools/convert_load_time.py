"""Load time of a Hugging Face checkpoint of Qwen2-0.5B's shapes (configs/qwen2-0.5b.yaml, random weights).

    python tools/convert_load_time.py --dir /tmp/qwen05 --write            # once: writes the checkpoint
    python tools/convert_load_time.py --dir /tmp/qwen05 --devices 8 --what from_hf
    python tools/convert_load_time.py --dir /tmp/qwen05 --devices 1 --what hf-to-jaxllm

`--devices N` fakes N CPU devices (XLA_FLAGS, set before JAX starts). Each measurement is one process,
so run the `jaxllm` to compare (e.g. PYTHONPATH=<another checkout>) with the same command. Prints one
JSON line: seconds of `from_hf` (parameters ready on the devices) or of `jaxllm convert hf-to-jaxllm`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).parents[1] / "configs" / "qwen2-0.5b.yaml"


def write_checkpoint(directory: Path, dtype: str) -> None:
    """config.json + model.safetensors of Qwen2-0.5B's shapes, weights N(0, 0.02^2)."""
    import jax
    import numpy as np

    from jaxllm import models
    from jaxllm.config import load_config
    from jaxllm.convert.hf import DTYPES, save_hf

    cfg = load_config(str(CONFIG), [f"model.param_dtype={dtype}"]).model
    rng = np.random.default_rng(0)
    abstract = models.model_spec(cfg)[1]
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape, np.float32)).astype(DTYPES[dtype]), abstract)
    save_hf(params, cfg, directory, dtype=dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the checkpoint is (or is written, with --write)")
    p.add_argument("--write", action="store_true", help="write the checkpoint, then exit")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--what", default="from_hf", choices=["from_hf", "hf-to-jaxllm"])
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    directory = Path(args.dir)
    if args.write:
        write_checkpoint(directory, args.dtype)
        print(f"wrote {directory}")
        return
    import jax

    import jaxllm

    if args.what == "from_hf":
        start = time.perf_counter()
        loaded = jaxllm.from_hf(directory)
        jax.block_until_ready(loaded.params)
        seconds = time.perf_counter() - start
    else:
        from jaxllm.cli import main as cli

        out = Path(tempfile.mkdtemp(prefix="convert-load-time-"))
        try:
            start = time.perf_counter()
            assert cli(["convert", "hf-to-jaxllm", str(directory), str(out / "run")]) == 0
            seconds = time.perf_counter() - start
        finally:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"what": args.what, "devices": jax.device_count(), "seconds": round(seconds, 2),
                      "jaxllm": str(Path(jaxllm.__file__).parent), "load_average": os.getloadavg()}))


if __name__ == "__main__":
    sys.exit(main())
