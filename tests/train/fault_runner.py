"""`python -m tests.train.fault_runner train CONFIG [overrides]`: the `jaxllm` command with a fault injected
from the test side, so jaxllm itself carries no fault hooks. Chosen by environment variables:

- JAXLLM_TEST_KILL_IN_SAVE=STEP: SIGKILL this process while checkpoint STEP is being sealed: all its
  files are written, its checksums are not, and Orbax has not renamed its temporary directory yet;
  the worst moment of an asynchronous save (it runs in Orbax's background thread).
- JAXLLM_TEST_FSIZE_FROM_SAVE=STEP: from the save of STEP on, no file may grow past 256 KiB
  (RLIMIT_FSIZE): the checkpoint's array files then fail to write with EFBIG, a real I/O error in
  Orbax's background write, as on a full disk. (The tokenizer and metrics files stay below it.)
"""

import os
import resource
import signal
import sys

from jaxllm.cli import main
from jaxllm.train import checkpoint

kill_step = os.environ.get("JAXLLM_TEST_KILL_IN_SAVE")
if kill_step is not None:
    seal = checkpoint.Checkpointer._seal

    def _seal_or_die(self):
        if self._saving == int(kill_step):
            os.kill(os.getpid(), signal.SIGKILL)
        seal(self)

    checkpoint.Checkpointer._seal = _seal_or_die

limit_step = os.environ.get("JAXLLM_TEST_FSIZE_FROM_SAVE")
if limit_step is not None:
    save = checkpoint.Checkpointer.save

    def _save_on_a_full_disk(self, step, *args, **kwargs):
        if step >= int(limit_step):
            self.wait()  # the previous save must still succeed: the limit is for the whole process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
        return save(self, step, *args, **kwargs)

    checkpoint.Checkpointer.save = _save_on_a_full_disk

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
