"""Where HGA's memory lives (see docs/DESIGN.md, "Ownership").

* vLLM's KV cache page of a block (allocated by vLLM, sized by ``customize_spec``) holds
  only that chunk's summaries: ``[H_kv, 1 + M, D]`` float32 (chunk row, then M groups).
* The host pool (``HostKVPool``, one tensor per layer) holds the full K/V of every block,
  addressed by the same vLLM block id: ``[num_blocks, H_kv, 2, 64, D]`` in the model dtype.
  On CUDA it is pinned host memory read and written by the GPU through UVA (zero-copy);
  on CPU it is ordinary memory.
* The device bank (bank.py) keeps an LRU working set of whole blocks of K/V in device
  memory for decode attention.
* One ``tiers.EngineTiers`` per engine owns the pool, the banks and the CUDA prefill
  scratch: it allocates them at the first bind and frees them at shutdown.
* With the NVMe tier on (``disk_dir``), the same tensor is a shared memory map of a file
  in ``disk_dir``: writes go to the page cache and the kernel writes them back; reads fault
  in only the 4 KiB pages of the groups routing selected.  The file is preallocated (a
  full disk fails at start-up, not mid-request) and unlinked as soon as it is mapped, so it
  disappears with the process, however the process ends.
"""

from __future__ import annotations

import errno
import mmap
import os

import torch

from .config import CHUNK_SIZE


def summary_view(kv_cache: torch.Tensor, groups: int, head_size: int) -> torch.Tensor:
    """vLLM's page tensor [num_blocks, H, 1, bytes/itemsize] seen as float32 [nb, H, 1+M, D]."""
    nb, H = kv_cache.shape[0], kv_cache.shape[1]
    return kv_cache.view(torch.float32).view(nb, H, 1 + groups, head_size)


class HostKVPool:
    """Full K/V of every vLLM block, per layer.  One instance per engine (tiers.py).

    budget_bytes (host_kv_bytes, or disk_kv_bytes with the NVMe tier) is what start-up
    sized vLLM's block count from; a layer that would take the pool past it raises.
    """

    def __init__(
        self, disk_dir: str | None = None, budget_bytes: int | None = None, metrics=None
    ) -> None:
        self.disk_dir = disk_dir
        self.budget_bytes = budget_bytes
        self.metrics = metrics  # a metrics.WorkerMetrics, or None
        self._layers: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] = {}  # pinned backing tensors on CUDA

    def layer(
        self,
        name: str,
        num_blocks: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        pool = self._layers.get(name)
        shape = (num_blocks, num_kv_heads, 2, CHUNK_SIZE, head_size)
        if pool is None or tuple(pool.shape) != shape or pool.dtype != dtype:
            pool = self._allocate(name, shape, dtype, device)
        return pool

    def _allocate(self, name, shape, dtype, device) -> torch.Tensor:
        # vLLM binds a small profiling cache before the real one: re-key on shape.
        self._layers.pop(name, None)
        old = self._host.pop(name, None)
        if old is not None:
            unpin_exact(old)
        self._check_budget(name, shape, dtype)
        if self.disk_dir is not None:
            if device.type != "cpu":
                raise NotImplementedError("the NVMe tier is CPU-only in this version")
            pool = map_file(self.disk_dir, name, shape, dtype)
        elif device.type == "cuda":
            host = pin_exact(torch.zeros(shape, dtype=dtype))
            from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

            self._host[name] = host
            pool = get_accelerator_view_from_cpu_tensor(host)
        else:
            # zeros, not empty: attention never weights an unwritten slot, but it must
            # not be NaN either (0 * NaN = NaN); zeroing also commits the RAM up front
            pool = torch.zeros(shape, dtype=dtype, device=device)
        self._layers[name] = pool
        self._report()
        return pool

    def _check_budget(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if self.budget_bytes is None:
            return
        want = self.nbytes() + _nbytes(shape, dtype)
        if want > self.budget_bytes:
            knob = "disk_kv_bytes" if self.disk_dir else "host_kv_bytes"
            raise MemoryError(
                f"hga: layer {name} takes the K/V pool to {want / 2**30:.2f} GiB, "
                f"over {knob} = {self.budget_bytes / 2**30:.2f} GiB that vLLM's "
                f"block count was sized from; raise {knob} or lower the block "
                "count (num_gpu_blocks_override)"
            )

    def check_room(self, need: int, num_blocks: int, num_layers: int, rank: int = 0) -> None:
        """Refuse (with the numbers) a pool of `need` bytes that this node's free RAM, or
        the NVMe tier's free disk space, cannot hold right now."""
        from .config import HGAConfigError

        need -= self.nbytes()  # what this pool holds already is not asked for again
        if need <= 0:
            return
        if self.disk_dir is not None:
            import shutil

            where, free = f"free space in {self.disk_dir}", shutil.disk_usage(self.disk_dir).free
        else:
            import psutil

            where, free = "available RAM", int(psutil.virtual_memory().available)
        if need > free:
            knob = "disk_kv_bytes" if self.disk_dir else "host_kv_bytes"
            raise HGAConfigError(
                f"hga: rank {rank} cannot allocate its K/V pool: {num_blocks} blocks x "
                f"{num_layers} layers need {need / 2**30:.2f} GiB but only "
                f"{free / 2**30:.2f} GiB of {where} is left on this node (other ranks and "
                f"processes took the rest). Lower {knob} (per rank), run fewer ranks per "
                "node, or free memory."
            )

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set(
                "disk_pool_bytes" if self.disk_dir else "host_pool_bytes", self.nbytes()
            )

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._layers.values())

    def release(self) -> None:
        """Drop every layer: pinned memory is unpinned and freed, file mappings unmapped
        (once no caller holds a view)."""
        self._layers.clear()
        for host in self._host.values():
            unpin_exact(host)
        self._host.clear()
        self._report()


# cudaHostRegisterPortable | cudaHostRegisterMapped: every context sees it, with a device
# address (UVA), which the kernels read the pool through
_HOST_REGISTER_FLAGS = 0x01 | 0x02


def pin_exact(host: torch.Tensor) -> torch.Tensor:
    """Pin `host` in place, exactly its bytes.  ``Tensor.pin_memory()`` goes through torch's
    caching host allocator, which rounds every block up to a power of two (a 1.1 GiB layer
    would take 2 GiB of pinned RAM the plan never counted) and copies; registering the
    pageable tensor pins what the plan says."""
    nbytes = host.numel() * host.element_size()
    err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, _HOST_REGISTER_FLAGS)
    if int(err) != 0:
        raise MemoryError(
            f"hga: cannot pin {nbytes / 2**30:.2f} GiB of host RAM for the K/V pool "
            f"(cudaHostRegister error {int(err)}); lower host_kv_bytes or raise the "
            "locked-memory limit (ulimit -l)"
        )
    return host


def unpin_exact(host: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel * torch.empty((), dtype=dtype).element_size()


def map_file(directory: str, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor backed by a new, preallocated, already-unlinked file in `directory`.

    disk_dir may be shared with other users, so the file is created exclusively (a name
    that already exists, a symlink included, is refused, never followed), mode 0600, and
    mapped through the descriptor that created it: the name is never opened again, so a
    symlink swapped in after the creation cannot make us map someone else's file."""
    nbytes = _nbytes(shape, dtype)
    path = os.path.join(directory, f"vllm-hga-{os.getpid()}-{name.replace('/', '_')}.kv")
    fd = _create_exclusive(path)
    created = os.fstat(fd)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise OSError(
                e.errno,
                f"hga: cannot reserve {nbytes / 2**30:.2f} GiB in "
                f"{directory} for the NVMe tier ({e.strerror}); free space or "
                "lower disk_kv_bytes",
            ) from None
        mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # a mapping keeps the file open
        ours = _unlink_if_ours(path, created)
    if not ours:
        raise OSError(
            errno.EEXIST,
            f"hga: {path} was replaced while the NVMe tier created it (another process "
            "writes in disk_dir); give disk_dir a directory only the server's user can write",
        )
    # the tensor holds the mapping: it is unmapped when the last view of it goes
    return torch.frombuffer(mapping, dtype=dtype).view(shape)


def _create_exclusive(path: str) -> int:
    """A new file at `path`, mode 0600; an existing name (a symlink too) is refused."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        raise OSError(
            errno.EEXIST,
            f"hga: {path} already exists (a file or symlink that is not ours); the NVMe "
            "tier only maps files it creates. Remove it, or give disk_dir a directory "
            "only the server's user can write",
        ) from None


def _unlink_if_ours(path: str, created: os.stat_result) -> bool:
    """Unlink the name if it is still the file we created (the mapping keeps the data);
    False, touching nothing, if another entry took its place."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    if (now.st_dev, now.st_ino) != (created.st_dev, created.st_ino):
        return False
    os.unlink(path)
    return True
