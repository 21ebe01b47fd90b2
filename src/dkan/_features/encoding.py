"""Running a frozen image encoder over crops: preprocessing on the device, chunked encoding, a crop loader."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dkan.nn.image_encoders import ImageEncoder


class Preprocess:
    """uint8 ``(N, 3, P, P)`` on the device -> float, resized to the encoder's ``input_size``, normalised."""

    def __init__(self, enc: ImageEncoder, device: torch.device) -> None:
        import torch

        self.size = int(enc.input_size) if enc.fixed_size else None
        std = torch.tensor(enc.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(enc.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) / std
        self.channels_last = True  # matches the encoder's layout (see _encode_all), on CUDA and on CPU

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        x = x.float()
        if self.size is not None and (x.shape[-1] != self.size or x.shape[-2] != self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = x * self.scale + self.shift
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def encode(enc: ImageEncoder, x: torch.Tensor, *, amp: torch.dtype | None, chunk: int) -> torch.Tensor:
    """Pooled features of normalised images, ``chunk`` images per encoder call, under autocast if ``amp``."""
    import torch

    out = []
    for i in range(0, len(x), max(int(chunk), 1)):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            out.append(enc(x[i : i + chunk]))
    return torch.cat(out) if out else x.new_zeros((0, enc.num_features))


class _Batches:
    """Map-style dataset whose items are whole batches: ``ds[list_of_indices] -> crops.read_batch(...)``."""

    def __init__(self, crops: Any) -> None:
        self.crops = crops

    def __getitem__(self, indices: list[int]) -> dict:
        return self.crops.read_batch(indices)


def crop_loader(crops: Any, *, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> Any:
    """DataLoader over ``crops`` yielding per-sample batches (each read in one call), in dataset order."""
    from torch.utils.data import DataLoader

    from dkan._features.crops import BatchBySample

    sampler = BatchBySample(crops, batch_size, shuffle=False)
    return DataLoader(
        _Batches(crops),
        batch_size=None,
        sampler=sampler,
        num_workers=int(num_workers),
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
