"""keep_freed_memory: freed feature maps are reused in place instead of faulted in again."""

import platform
import subprocess
import sys

import pytest

# the minor page faults of allocating, filling and freeing a 64 MiB tensor 20 times, after 10 such rounds; each
# run in its own process, since malloc's settings are process-wide
FAULTS = """
import resource, sys, torch
from timm_metaperturb.training.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for i in range(30):
    if i == 10:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")
def test_kept_freed_memory_is_reused_without_page_faults():
    pages = 2**26 // 4096
    default, kept = _faults("default"), _faults("keep")
    assert default >= 10 * pages  # glibc maps every block this large afresh: each round faults most of its pages in
    assert kept < pages  # reused in place: not even one round's worth over twenty
