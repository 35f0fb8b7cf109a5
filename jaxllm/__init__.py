"""jaxllm: train, adapt and serve large language models with JAX."""

__version__ = "0.1.0"


def from_hf(path, devices=None, param_dtype=None, mesh=None, adapter=None):
    """A ready model from a Hugging Face directory, with a PEFT LoRA `adapter` directory loaded onto it
    when given; see `jaxllm.convert.hf.from_hf`."""
    from jaxllm.convert.hf import from_hf as _from_hf

    return _from_hf(path, devices=devices, param_dtype=param_dtype, mesh=mesh, adapter=adapter)
