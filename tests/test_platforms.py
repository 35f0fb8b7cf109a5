"""Which JAX platforms `jaxllm` lets JAX initialise: off a TPU VM, never libtpu's (see test_cli.py for
the commands themselves)."""

import pytest

from jaxllm.platforms import keep_off_tpu, on_tpu_vm


def test_tpu_is_skipped_only_where_there_is_no_tpu_and_no_choice_was_made():
    pytest.importorskip("libtpu")
    if on_tpu_vm({}):
        pytest.skip("a TPU VM: JAX is left to use its TPU")
    env = {}
    assert keep_off_tpu(env) == env["JAX_PLATFORMS"] and env["JAX_PLATFORMS"].endswith("cpu")
    assert "tpu" not in env["JAX_PLATFORMS"]
    for chosen in ({"JAX_PLATFORMS": "tpu,cpu"}, {"TPU_NAME": "my-tpu"}, {"TPU_WORKER_HOSTNAMES": "a,b"},
                   {"JAX_FORCE_TPU_INIT": "1"}):
        env = dict(chosen)
        assert keep_off_tpu(env) is None and env == chosen
