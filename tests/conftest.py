import gc
import multiprocessing
import os
import sys

# Custom passes must run on every compile: never serve graphs from Inductor's caches.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.
# It must be set before any @triton.jit function is defined (zerograph.kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# zerograph.runtime.launch.spawn's ranks and the rank pool's (tests/_pool.py)
# fork from one server per test process that imported these once, instead of
# each new interpreter importing torch, zerograph and transformers again (~3-4 s
# of CPU per rank; docs/testing.md). The list takes effect when the server
# starts, at the first rank. Subprocesses (doc examples, the CLI) inherit the
# start method; their servers import their __main__.
os.environ.setdefault("ZEROGRAPH_START_METHOD", "forkserver")
multiprocessing.set_forkserver_preload([
    "torch", "torch.distributed", "torch._dynamo", "zerograph", "zerograph.api", "transformers",
    "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama",
    "tests._models", "tests._harness",
])

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests import _xdist  # noqa: E402

pytest_xdist_auto_num_workers = _xdist.auto_num_workers
pytest_collection_modifyitems = _xdist.collection_modifyitems
pytest_sessionfinish = _xdist.sessionfinish
pytest_testnodedown = _xdist.testnodedown
pytest_xdist_make_scheduler = _xdist.make_scheduler

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several test processes on this machine: a fair share of its cores
    torch.set_num_threads(_xdist.threads_per_worker())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with Dynamo's caches empty: what an earlier test
    compiled never serves (or counts against the recompile limit of) this one."""
    torch._dynamo.reset()
    yield


def pytest_collection_finish(session):
    """Everything alive after collection (torch, transformers, the test modules)
    stays for the session: freeze it out of the garbage collector's walks, as
    each pool rank does (tests/_pool.py), so collections cost what the tests allocate."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def _rank_pools():
    """The pools of long-lived gloo ranks (tests/_pool.py) end with the session."""
    yield
    pool = sys.modules.get("tests._pool")
    if pool is not None:
        pool.close_all()


def pytest_terminal_summary(terminalreporter):
    """How the rank pools went: calls, starts, and why ranks were killed early
    (per xdist worker when the tests ran in several)."""
    pool = sys.modules.get("tests._pool")
    if pool is not None and pool.summary():
        terminalreporter.write_line(pool.summary())
    for line in _xdist.worker_pool_summaries(terminalreporter.config):
        terminalreporter.write_line(line)


@pytest.fixture
def fake_world():
    """A two-rank fake process group in this process (pass-level tests), with
    Dynamo's caches reset before and after."""
    from zerograph._torch_private import fake_store

    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=2)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    dist.destroy_process_group()
