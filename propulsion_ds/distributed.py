"""Process-group set-up for every launcher: deepspeed, torchrun, mpirun and SLURM's srun."""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import torch

log = logging.getLogger(__name__)


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list ("node[3-5,9],gpu1" -> "node3"), as the address slurmd uses.

    SLURM's NodeAddr is the host name on most clusters, and an IP where names do not resolve
    (containers, network namespaces); fall back to the name, then to parsing the list by hand.
    """
    first = None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            first = out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if first is None:
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            head = prefix + rest.rstrip("]").split(",")[0].split("-")[0]
        return head
    try:
        node = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True,
                              text=True, timeout=30, check=True).stdout
        for field in node.split():
            if field.startswith("NodeAddr=") and field[len("NodeAddr="):]:
                return field[len("NodeAddr="):]
    except (OSError, subprocess.SubprocessError):
        pass
    return first


def env_from_mpi(env=os.environ) -> None:
    """Under Open MPI's mpirun with a MASTER_PORT given (`-x MASTER_PORT=...`), map its variables to torch's.

    Without this DeepSpeed's MPI discovery always uses port 29500, so two jobs on one machine collide.
    MASTER_ADDR comes from the environment, or is 127.0.0.1 when every rank runs on this host; with
    several hosts and no MASTER_ADDR, DeepSpeed's discovery (rank 0's `hostname -I`, port 29500) is used.
    """
    if "OMPI_COMM_WORLD_RANK" not in env or "RANK" in env or "MASTER_PORT" not in env:
        return
    size = env.get("OMPI_COMM_WORLD_SIZE", "1")
    if "MASTER_ADDR" not in env:
        if env.get("OMPI_COMM_WORLD_LOCAL_SIZE") != size:
            return
        env["MASTER_ADDR"] = "127.0.0.1"
    env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
    env["WORLD_SIZE"] = size
    env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")


def env_from_slurm(env=os.environ) -> None:
    """When srun starts the trainer directly (one task per GPU), map SLURM's variables to torch's.

    Only inside a job step (srun sets SLURM_STEP_ID): the batch shell also carries SLURM_PROCID=0 and
    the job's SLURM_NTASKS, and a trainer started there without srun is one process, not rank 0 of N.
    torchrun (RANK) and mpirun (OMPI_COMM_WORLD_RANK, PMI_RANK) set their own variables and win.
    MASTER_ADDR/MASTER_PORT already in the environment (train.sbatch exports both) are kept.
    An mpirun launch (inside an allocation or not) is handed to env_from_mpi first.
    """
    env_from_mpi(env)
    if ("SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env or "RANK" in env
            or "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env):
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = slurm_master_addr(env.get("SLURM_STEP_NODELIST",
                                                       env.get("SLURM_JOB_NODELIST", "localhost")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def _skip_shm_build() -> None:
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory comm op on first init (~60 s);
    # gloo alone gives the same step times. Patch the real module (see notes/deepspeed-on-cpu.md).
    import deepspeed.comm.torch  # noqa: F401
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed(timeout_minutes: float = 30.0) -> None:
    import deepspeed

    env_from_slurm()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shm_build()
    if torch.distributed.is_initialized():
        return
    mpi = under_mpi()
    if mpi:
        init_mpi()      # before the rendezvous: a rank that fails in it can still mpi_abort
    single = not mpi and "RANK" not in os.environ
    if single:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(auto_mpi_discovery=mpi, verbose=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    watch_peers()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device_index(int(os.environ.get("LOCAL_RANK", "0")),
                                                 torch.cuda.device_count()))


def local_device_index(local_rank: int, device_count: int) -> int:
    """Which of the visible GPUs this process uses.

    Two cluster set-ups must both work: every task sees all of the node's GPUs (torchrun, the
    deepspeed launcher, `srun --gpus-per-node=8` without binding): LOCAL_RANK picks one; or SLURM
    binds one GPU per task (`--gpus-per-task=1`, `--gpu-bind=single:1`, CUDA_VISIBLE_DEVICES set per
    task): each task sees exactly one device, index 0, while LOCAL_RANK may be 3. So: 0 when one
    device is visible, else LOCAL_RANK modulo the visible count (more ranks than GPUs share them).
    """
    if device_count < 1:
        raise ValueError(f"no GPU visible (device_count={device_count})")
    if device_count == 1:
        return 0
    return local_rank % device_count


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    """Collective: rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself without a group."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def patient_barrier(hours: float = 12.0):
    """Collective: a barrier callable for waits on long one-rank work (tokenizing a large data
    set), on its own gloo group whose timeout is ``hours``, not distributed.timeout_minutes."""
    if not torch.distributed.is_initialized():
        return lambda: None
    group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=hours))
    return lambda: torch.distributed.barrier(group=group)


def all_reduce(values: list, op="sum") -> list:
    """One collective for a handful of floats (loss, tokens, flags)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        if backend == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max"
                                     else torch.distributed.ReduceOp.SUM)
    return t.cpu().tolist()


def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another rank died or timed out (gloo/NCCL/store errors)."""
    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and re.search(
        r"gloo|nccl|Connection (closed|reset)|[Tt]imed out|[Tt]imeout|pair closure|Broken pipe|"
        r"ProcessGroup|TCPStore", str(e)) is not None


# ------------------------------------------------------------------------------------ the end of a run
# Store keys of the final barrier. The TCPStore, not a collective: a rank that fails alone (bad data
# on one node) must not pair its last barrier with a collective its peers are waiting in.
_ARRIVED, _ALL, _LEFT = "propulsion_ds/exit/arrived", "propulsion_ds/exit/all", "propulsion_ds/exit/left"


def under_mpi(env=os.environ) -> bool:
    return "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env


def shutdown(timeout_s: float = 60.0) -> bool:
    """The orderly end of a run on this rank: a final barrier, then destroy the process group.

    Every rank calls it once, after its last collective (finished, or an error every rank raised).
    The barrier is bounded by ``timeout_s``; True when every rank arrived and the group was destroyed.
    False when some rank did not arrive in time (it died, or failed alone and its peers are still
    waiting in a collective): the group is left as it is, and the caller must leave without running
    its destructors (os._exit, or MPI Abort under mpirun). Without a process group this does nothing.

    Why: the interpreter exiting with gloo/NCCL's threads alive can abort at exit ("terminate called
    without an active exception", SIGABRT, exit 134) after a run that finished, and a rank that hosts
    the rendezvous store (rank 0 under srun, mpirun, python) must not leave while another rank still
    talks to it. So: all ranks arrive; each destroys its group, then says so in the store; the
    store's host (and every other rank) leaves only after every rank has said so.
    """
    if not torch.distributed.is_initialized():
        return True
    if _watch is not None:
        _watch.exiting.set()     # the orderly end: a peer's failure no longer makes this rank leave
    world = torch.distributed.get_world_size()
    if world == 1:
        torch.distributed.destroy_process_group()
        return True
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private helper; without it use the group's own barrier
        store = None
    if store is None:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    deadline = time.monotonic() + timeout_s
    try:
        if store.add(_ARRIVED, 1) == world:
            store.set(_ALL, "1")
        # in short waits: the ranks that left on a peer's failure (their watch) never arrive
        store.set_timeout(datetime.timedelta(seconds=1.0))
        while True:
            try:
                store.wait([_ALL])
                break
            except Exception:  # noqa: BLE001 - not yet
                if time.monotonic() >= deadline or _peers_gone(int(store.add(_ARRIVED, 0)), world):
                    raise
    except Exception as e:  # noqa: BLE001 - timeout, or the store's host is gone
        log.debug("final barrier: %s", e)
        return False
    me = torch.distributed.get_rank()
    # ``store`` stays referenced past the group: rank 0 may host it (srun, mpirun, the deepspeed
    # launcher; under torchrun the agent does), and the others still need it to say they left.
    torch.distributed.destroy_process_group()
    try:
        left = store.add(_LEFT, 1)
        while me == 0 and left < world and time.monotonic() < deadline + 10.0:
            time.sleep(0.01)
            left = store.add(_LEFT, 0)
    except Exception as e:  # noqa: BLE001 - the group is gone already; nothing else to wait for
        log.debug("final barrier (leaving): %s", e)
    del store
    return True


def init_mpi() -> bool:
    """Under mpirun: initialise MPI (mpi4py) now, on every rank; True when MPI is initialised.

    Call it first thing, before anything can fail: MPI_Init is collective in Open MPI (a rank that
    initialises it alone waits for the others), so only once every rank has it can a failing rank
    end the job with ``mpi_abort``. The process group itself still rendezvouses over TCP (env://).
    """
    if not under_mpi():
        return False
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    return MPI.Is_initialized() and not MPI.Is_finalized()


def mpi_abort(code: int) -> None:
    """End the whole MPI job with ``code`` (MPI_Abort) from a rank that cannot end in order: it
    failed before the process group formed, or its peers did not reach the final barrier. mpirun
    stops every rank and exits with ``code``, where a normal exit would wait in MPI_Finalize for
    ranks that wait in a collective for it. Returns when MPI is not initialised in this process
    (never initialises it: that would wait for the other ranks)."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.COMM_WORLD.Abort(code)


# ------------------------------------------------------------------------------ a failed peer
# A rank that fails alone (bad data on one node) leaves through launch/train.py's finish(); its
# peers are waiting in a collective that would only give up after distributed.timeout_minutes
# (or the patient barrier's hours). So the failing rank posts its exit code in the rendezvous
# store, and every rank runs a thread that polls for it and leaves with the same code.
_FAILED, _GONE = "propulsion_ds/failed", "propulsion_ds/exit/gone"
POLL_S = 0.5
# How long a rank that saw a peer's failure waits before leaving: its own main thread may reach
# finish() meanwhile (a failure every rank raised together), and the failed rank prints its error
# line within launch/train.py's 10 s wait for rank 0's: it must be out before a launcher (mpirun,
# torchrun) stops the job on this rank's exit.
GRACE_S = 12.0


class _PeerWatch:
    """The polling thread and this rank's own store clients (one per thread: a client's
    ``wait`` holds the connection, so the thread never shares the main thread's)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.exiting = threading.Event()    # this rank reached its own end (finish / excepthook)
        self.main = _store_client()         # announce_exit and shutdown, from the main thread
        self.thread = threading.Thread(target=self._run, name="propulsion-peer-watch", daemon=True)

    def _run(self) -> None:
        try:
            store = _store_client()
        except Exception as e:  # noqa: BLE001 - no store to watch: the collective timeout still bounds a hang
            log.debug("peer watch: no store client: %s", e)
            return
        while not self.exiting.wait(POLL_S):
            try:
                if not store.check([_FAILED]):
                    continue
                failure = json.loads(store.get(_FAILED).decode())
            except Exception as e:  # noqa: BLE001 - the store's host left: nothing to watch any more
                log.debug("peer watch stopped: %s", e)
                return
            if failure["rank"] == self.rank:
                return
            # A failure every rank raised together (an agreed error) brings this rank to finish()
            # within moments: only a rank still elsewhere after the grace leaves from here.
            if self.exiting.wait(GRACE_S):
                return
            if self.rank == 0:
                log.warning("rank %d failed (exit %d, its error line says why); stopping this rank too",
                            failure["rank"], failure["code"])
            try:
                store.add(_GONE, 1)
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
            _leave(int(failure["code"]))


_watch: _PeerWatch | None = None


def _store_client():
    """A client of the rendezvous store (MASTER_ADDR:MASTER_PORT) of its own."""
    return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                      is_master=False, timeout=datetime.timedelta(seconds=30),
                                      wait_for_workers=False)


def _leave(code: int) -> None:
    """Exit now, from any thread, without Python's teardown (the process group is in use by the
    main thread); under mpirun end the whole job with ``code`` (MPI_Abort)."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi_abort(code)
    os._exit(code)


def watch_peers() -> bool:
    """Start watching for a peer's failure (after the process group formed; once). True when the
    watch runs: several ranks and a reachable rendezvous store."""
    global _watch
    if _watch is not None or not torch.distributed.is_initialized() or world_size() == 1:
        return _watch is not None
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return False
    try:
        _watch = _PeerWatch(rank(), world_size())
    except Exception as e:  # noqa: BLE001 - the collective timeout still bounds a hang
        log.debug("peer watch not started: %s", e)
        return False
    _watch.thread.start()
    # The watch thread sits in store calls; killed there at interpreter exit it aborts the process
    # ("terminate called without an active exception") after a run that finished: stop it first.
    atexit.register(_stop_watch)
    previous = sys.excepthook

    def excepthook(kind, value, tb):   # a crash (a bug, not a PropulsionError) tells the peers too
        announce_exit(1, f"{kind.__name__}: {value}")
        previous(kind, value, tb)

    sys.excepthook = excepthook
    return True


def _stop_watch() -> None:
    if _watch is not None:
        _watch.exiting.set()
        _watch.thread.join(timeout=POLL_S + 5.0)


def announce_exit(code: int, message: str | None = None) -> None:
    """This rank is ending with ``code``: stop watching, and unless ``code`` is 0 tell the other
    ranks, whose watch makes them leave with the same code within seconds (the first failure
    posted wins). Call it first thing when the run ends on this rank, before any barrier."""
    w = _watch
    if w is None:
        return
    w.exiting.set()
    if code == 0:
        return
    payload = json.dumps({"rank": w.rank, "code": int(code), "message": (message or "")[:500]})
    try:
        w.main.compare_set(_FAILED, "", payload)
    except Exception as e:  # noqa: BLE001 - the peers fall back to their collective timeout
        log.debug("could not post this rank's failure: %s", e)


def _peers_gone(arrived: int, world: int) -> bool:
    """True when every rank that did not arrive at the final barrier left through its watch."""
    if _watch is None:
        return False
    try:
        return arrived + int(_watch.main.add(_GONE, 0)) >= world
    except Exception:  # noqa: BLE001
        return False
