"""The per-pixel transforms on the training device, batched (``data.device_transforms``).

With ``DataConfig.device_transforms`` the loader stops after decoding: items
carry ``video`` as uint8 frames ``(T, h, w, 3)`` (``(V, T, h, w, 3)`` with test
views) at the decoded size plus ``video_size`` = ``(h, w)``, and ``audio`` as the
window's 16 kHz samples ``(1, N)`` (``(V, 1, N)``) plus ``audio_span`` = (usable
samples, first fbank frame) (:func:`audio.window_wave`); :func:`collate_clips`
pads frames of different sizes to the batch's largest. :class:`DeviceTransform`
then does on the device, for a whole batch, what :func:`audio.window_fbank`,
:func:`video.transform_frames`, :func:`audio.spec_augment` and
:func:`audio.normalize_fbank` do per clip on the CPU:

- the Kaldi fbank of every window at once (:func:`audio.batched_fbank`: the
  operations of ``torchaudio.compliance.kaldi.fbank``, whose one-waveform API
  cannot batch), equal to the CPU path's within float32 rounding;

- training: the random resized crop (torchvision's algorithm,
  :func:`video.random_resized_crop_box`), the resize to ``S x S`` (bilinear,
  antialiased when shrinking), the flip with probability ``flip_prob``; SpecAugment
  (torchaudio's ``FrequencyMasking(freqm)`` then ``TimeMasking(timem)``: the same
  formulas over the same uniform draws, one mask pair per clip, applied batched);
- testing: the short side resized to ``S`` and the centre crop;
- both: ``[0, 1]`` pixels, ``(x - mean) / std`` per channel, and AST's
  ``(fbank - mean) / (2 * std)``.

Randomness: the parameters of clip ``i`` in epoch ``e`` are drawn on the CPU
from the generators seeded by ``(seed, e, i, 5)``, in the CPU path's order (crop
box, flip, frequency mask, time mask), so they depend only on the clip and the
epoch, and exact resume holds as for the CPU path. Under the same RNG state the
draws are the CPU path's, and on the CPU the video outputs are bit-identical to
its (tested); the audio differs by the batched fbank's float32 rounding (about
1e-5 of the fbank's range), so a run with device transforms is not bit-identical
to one without.

Batching: normalisation, flips and SpecAugment are single batched operations;
the resize runs once per group of clips with the same crop (test: the same
decoded size, so one call for a prepared data set; training: once per clip, each
call resizing all ``T`` frames), with the same interpolation as the CPU path.
On CUDA the frames are resized in float32 (the CPU path resizes uint8, which
rounds to whole grey levels): values differ by less than one grey level.
"""

from __future__ import annotations

import collections

import torch

from .audio import batched_fbank
from .dataset import DataConfig
from .video import random_resized_crop_box, resize_frames


def _draw(cfg: DataConfig, h: int, w: int, num_mel_bins: int, frames: int) -> dict:
    """One clip's training parameters from the current torch RNG, in the CPU path's order."""
    p: dict = {}
    if cfg.modalities in ("av", "video"):
        p["box"] = random_resized_crop_box(h, w, cfg.train_scale, cfg.train_ratio)
        p["flip"] = cfg.flip_prob > 0 and float(torch.rand(())) < cfg.flip_prob
    if cfg.modalities in ("av", "audio"):
        # torchaudio.functional.mask_along_axis: value ~ U(0, param), start ~ U(0, size - value)
        for name, param, size in (("freq", cfg.freqm, num_mel_bins), ("time", cfg.timem, frames)):
            if param > 0:
                value = torch.rand(1) * param
                start = torch.rand(1) * (size - value)
                p[name] = (int(start.long()), int(start.long() + value.long()))
    return p


class DeviceTransform:
    """Batched transforms on ``device`` (see the module docstring).

    Args:
        config: the loader's DataConfig (``device_transforms=True``).
        seed: the run's seed (``train.seed``).
    """

    def __init__(self, config: DataConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)

    def params(self, batch: dict, epoch: int) -> list[dict]:
        """The training parameters of each clip of ``batch`` (empty dicts in test mode)."""
        from mmt_fast.data.seeding import derive_seed, run_seeded

        if not self.config.train:
            return [{} for _ in batch["index"]]
        sizes = batch.get("video_size")
        f, t = self.config.num_mel_bins, self.config.target_length  # the fbank's shape
        out = []
        for b, i in enumerate(batch["index"].tolist()):
            h, w = (0, 0) if sizes is None else sizes[b].tolist()
            s = derive_seed(self.seed, epoch, i, 5)
            out.append(run_seeded(s, _draw, self.config, h, w, f, t))
        return out

    def __call__(
        self, batch: dict, device: torch.device | str = "cpu", epoch: int = 0, params=None
    ) -> dict:
        """``batch`` with ``video`` (B, 3, T, S, S) / (B, V, 3, T, S, S) float32 and ``audio``
        normalised, on ``device``; ``params``: per-clip parameters (default :meth:`params`)."""
        if batch.get("batch_size", 1) == 0:
            return batch
        device = torch.device(device)
        params = self.params(batch, epoch) if params is None else params
        out = dict(batch)
        if "video" in batch:
            out["video"] = self.video(batch["video"], batch["video_size"], params, device)
        if "audio" in batch:
            out["audio"] = self.audio(batch["audio"], params, device, batch.get("audio_span"))
            out.pop("audio_span", None)
        return out

    # ------------------------------------------------------------------ video
    def video(
        self, frames: torch.Tensor, sizes: torch.Tensor, params: list[dict], device: torch.device
    ) -> torch.Tensor:
        """uint8 (B, [V,] T, H, W, 3) padded frames and their (B, 2) sizes -> normalised float32."""
        cfg, S = self.config, self.config.crop_size
        views = frames.ndim == 6
        x = frames if views else frames.unsqueeze(1)  # (B, V, T, H, W, 3)
        B, V, T = x.shape[:3]
        x = x.to(device, non_blocking=True)
        mean, std = self._mean.to(device), self._std.to(device)
        out = torch.empty(B, V, 3, T, S, S, device=device)
        groups: dict = collections.defaultdict(list)  # clips sharing one resize call
        for b in range(B):
            h, w = sizes[b].tolist()
            if cfg.train:
                top, left, ch, cw = params[b]["box"]
                groups[(b,)].append((b, top, left, ch, cw, (S, S), params[b].get("flip", False)))
            else:
                s = S / min(h, w)
                nh, nw = max(S, round(h * s)), max(S, round(w * s))
                groups[(h, w)].append((b, 0, 0, h, w, (nh, nw), False))
        for members in groups.values():
            bs = [m[0] for m in members]
            _, top, left, ch, cw, size, flip = members[0]
            # a run of consecutive clips is a view; others are gathered (a copy)
            sel = slice(bs[0], bs[-1] + 1) if bs == list(range(bs[0], bs[-1] + 1)) else bs
            crop = x[sel, :, :, top : top + ch, left : left + cw]  # (G, V, T, ch, cw, 3)
            crop = crop.flatten(0, 2).permute(0, 3, 1, 2)  # (G*V*T, 3, ch, cw)
            if crop.device.type != "cpu":
                crop = crop.float()  # CUDA: resize in float32 (no uint8 antialiasing kernel)
            r = resize_frames(crop, size)
            if not cfg.train:
                t0, l0 = (size[0] - S) // 2, (size[1] - S) // 2
                r = r[:, :, t0 : t0 + S, l0 : l0 + S]
            if r.dtype == torch.uint8:
                r = r.float()
            else:
                r = r.round().clamp_(0, 255)
            r.div_(255.0)
            if flip:
                r = r.flip(-1)
            r.sub_(mean).div_(std)  # the CPU path's (x - mean) / std, in place
            out[sel] = r.view(len(bs), V, T, 3, S, S).permute(0, 1, 3, 2, 4, 5)
        return out if views else out[:, 0]

    # ------------------------------------------------------------------ audio
    def fbank(self, wave: torch.Tensor, span: torch.Tensor, device: torch.device) -> torch.Tensor:
        """16 kHz windows (B, [V,] 1, N) and their spans (B, [V,] 2) -> the unnormalised
        fbank (B, [V,] 1, F, Tt), computed on ``device`` for all of them at once."""
        cfg = self.config
        lead = wave.shape[:-2]
        w = wave.to(device, non_blocking=True).reshape(-1, wave.shape[-1])
        fb = batched_fbank(w, span.reshape(-1, 2), cfg.target_length, cfg.num_mel_bins,
                           cfg.sample_rate)  # fmt: skip
        return fb.transpose(1, 2).reshape(*lead, 1, cfg.num_mel_bins, cfg.target_length)

    def audio(self, spec: torch.Tensor, params: list[dict], device: torch.device,
              span: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Unnormalised fbank (B, [V,] 1, F, Tt), or the waves (B, [V,] 1, N) and ``span``
        of the loader's items -> SpecAugment (training) and AST normalisation."""
        cfg = self.config
        if span is not None:
            spec = self.fbank(spec, span, device)
        x = spec.to(device, non_blocking=True).float()
        if cfg.train:
            B, (F, Tt) = x.shape[0], x.shape[-2:]
            keep_shape = (B,) + (1,) * (x.ndim - 3)
            for name, n, axis in (("freq", F, -2), ("time", Tt, -1)):
                if name not in params[0]:
                    continue
                lim = torch.tensor([p[name] for p in params], device=device)  # (B, 2)
                pos = torch.arange(n, device=device)
                m = (pos >= lim[:, :1]) & (pos < lim[:, 1:])  # (B, n)
                m = m.view(*keep_shape, n, 1) if axis == -2 else m.view(*keep_shape, 1, n)
                x = x.masked_fill(m, 0.0)
        return (x - cfg.audio_mean) / (cfg.audio_std * 2)
