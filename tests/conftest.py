import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

from comfy_host import ComfyServer, ensure_checkpoint, host_ready  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow tier: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def comfy():
    """One real ComfyUI server for the session, with the mini and the 16-layer test checkpoints."""
    if not host_ready():
        pytest.fail("the ComfyUI host is not installed: run scripts/setup_host.sh (scripts/test.sh does)")
    checkpoints = {"cidm_mini_sd15.safetensors": ensure_checkpoint("mini"),
                   "cidm_sd15_blocks.safetensors": ensure_checkpoint("sd15-blocks")}
    with tempfile.TemporaryDirectory(prefix="cidm-comfy-") as workspace:
        server = ComfyServer(Path(workspace), checkpoints).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfy, request):
    """The name, in the session server, of an SDXL test checkpoint (scripts/make_test_checkpoint.py): by default
    `sdxl-blocks` (SDXL's 70 cross-attention layers in a 283 M UNet, 3-layer CLIP-L and CLIP-G, the SD VAE; 1.05 GiB
    in fp16, generated in about 20 s on 2 cores); `sdxl-full` (the 2.6 B UNet, 5.3 GiB, about 90 s and 12 GB of
    memory to generate) through indirect parametrization, for the slow tier. Load it with
    CIDMTest_SmallTowerCheckpointLoader. Generated on first use, then cached under CIDM_CACHE, so a run without
    SDXL tests neither writes nor reads it."""
    layout = getattr(request, "param", "sdxl-blocks")
    return comfy.link_checkpoint(f"cidm_{layout.replace('-', '_')}.safetensors", ensure_checkpoint(layout))
