"""Published peak numbers of the data-centre GPUs `hrmspec show --roofline` predicts for.

Every number is the vendor's datasheet figure for one GPU of the SXM form factor, dense (NVIDIA's
headline tensor-core figures for Hopper and Blackwell are "with sparsity": twice the dense rate):

    bf16_tflops   peak BF16 tensor-core throughput, dense: what matmuls and attention run at
    fp32_tflops   peak FP32 throughput of the CUDA cores (no tensor cores): what row kernels compute at
                  (they upcast to fp32 after load), and fp32 matmuls without TF32
    hbm_tbps      HBM bandwidth, TB/s (10^12 bytes per second)

Sources (NVIDIA datasheets):

    a100  NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: BF16 Tensor Core 312 TFLOPS
          (624 with sparsity), FP32 19.5 TFLOPS, HBM2e 2,039 GB/s
    h100  NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 Tensor Core 1,979 TFLOPS
          with sparsity (989 dense), FP32 67 TFLOPS, HBM3 3.35 TB/s
    h200  NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: BF16 Tensor Core 1,979 TFLOPS
          with sparsity (989 dense), FP32 67 TFLOPS, HBM3e 4.8 TB/s
    b200  NVIDIA HGX B200 datasheet (8 GPUs at 1,000 W each): FP16/BF16 Tensor Core 36 PFLOPS with
          sparsity (2,250 TFLOPS dense per GPU), FP32 640 TFLOPS (80 per GPU), 64 TB/s HBM3e
          (8 TB/s per GPU)

The prices (`dollars_per_hour`, what `hrmspec cost` charges by default) and their sources are in
docs/compare.md. Peaks, not what kernels reach: a roofline's time is a lower bound. The table is plain Python (no
torch) so that `show` needs nothing else; docs/kernels.md repeats it with the sources.
"""

from __future__ import annotations

from dataclasses import dataclass

from hrmspec.errors import HrmspecError, close_match


class GPUError(HrmspecError):
    """A GPU name the table does not hold."""


@dataclass(frozen=True)
class GPU:
    name: str  # the product, as the datasheet names it
    bf16_tflops: float  # dense tensor-core peak, 10^12 FLOP/s
    fp32_tflops: float  # CUDA-core peak, 10^12 FLOP/s
    hbm_tbps: float  # 10^12 bytes/s
    source: str  # the datasheet the numbers come from
    dollars_per_hour: float  # a typical on-demand cloud price per GPU-hour (`hrmspec cost`; docs/compare.md)
    key: str = ""  # the table's name for it (h100)

    def peak_flops(self, tensor_cores: bool, dtype_bytes: int = 2) -> float:
        """FLOP/s of a kernel: tensor cores at bf16 for 2-byte matmuls; the fp32 CUDA cores otherwise."""
        return 1e12 * (self.bf16_tflops if tensor_cores and dtype_bytes <= 2 else self.fp32_tflops)

    @property
    def bandwidth(self) -> float:
        """HBM bytes/s."""
        return 1e12 * self.hbm_tbps


GPUS: dict[str, GPU] = {
    "a100": GPU(name="NVIDIA A100 80GB SXM", bf16_tflops=312.0, fp32_tflops=19.5, hbm_tbps=2.039,
                source="NVIDIA A100 Tensor Core GPU datasheet", dollars_per_hour=1.50, key="a100"),
    "h100": GPU(name="NVIDIA H100 SXM", bf16_tflops=989.0, fp32_tflops=67.0, hbm_tbps=3.35,
                source="NVIDIA H100 Tensor Core GPU datasheet", dollars_per_hour=2.00, key="h100"),
    "h200": GPU(name="NVIDIA H200 SXM", bf16_tflops=989.0, fp32_tflops=67.0, hbm_tbps=4.8,
                source="NVIDIA H200 Tensor Core GPU datasheet", dollars_per_hour=3.00, key="h200"),
    "b200": GPU(name="NVIDIA B200 (HGX B200, 1,000 W)", bf16_tflops=2250.0, fp32_tflops=80.0, hbm_tbps=8.0,
                source="NVIDIA HGX B200 datasheet (8-GPU figures / 8)", dollars_per_hour=4.50, key="b200"),
}


def get_gpu(name: str) -> GPU:
    """The table's entry for `name` (case-insensitive), or a GPUError naming the ones there are."""
    key = name.strip().lower()
    if key not in GPUS:
        hint = close_match(key, GPUS)
        raise GPUError(f"unknown GPU '{name}'; known: {', '.join(GPUS)}" + (f" ({hint})" if hint else ""))
    return GPUS[key]


__all__ = ["GPU", "GPUS", "GPUError", "get_gpu"]
