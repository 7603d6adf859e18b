"""A Kalman filter for boxes whose motion is driven by elapsed media seconds, batched over tracks.

State per track (8 numbers, pixels and pixels per second):

    mean = [cx, cy, w, h, vx, vy, vw, vh]        cov = (8, 8)

Everything is batched: `mean (N, 8)`, `cov (N, 8, 8)` for N tracks, so one update costs a
few numpy calls whatever the number of tracks. Two choices make it hold at 1–2 updates per
second as well as at 30:

- **Time, not frames.** The transition and the process noise are built from `dt`, the
  seconds since the track's last prediction. Position uncertainty grows like `dt³` from the
  velocity noise plus `dt²` from the velocity's own uncertainty, so the association gate
  widens by itself when updates are sparse or a track was missed.
- **Velocity that does not overshoot.** Velocity decays towards zero with time constant
  `tau` (an Ornstein–Uhlenbeck velocity): over a gap `dt` the predicted travel is
  `v · tau · (1 − e^(−dt/tau))`, close to `v · dt` for short gaps and at most `v · tau` for
  long ones, so a noisy velocity from two sightings cannot fling a lost track across the
  image.

Noise is relative to the box, so the same numbers work for a 20-pixel face and a 400-pixel
bus: measurement noise is a fraction of the box's width (x, w) and height (y, h); motion
noise is in box sizes (`sqrt(w · h)`) per second.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

__all__ = ["BoxKalman", "xyxy_to_cxcywh"]

F64 = NDArray[np.float64]

# Box size changes this fraction as fast as position (sizes change slowly compared to motion).
_SIZE_NOISE_RATIO = 0.2
_EYE4 = np.eye(4)


def xyxy_to_cxcywh(xyxy: NDArray[np.floating]) -> F64:
    """`(N, 4)` x1, y1, x2, y2 → `(N, 4)` centre x, centre y, width, height (float64)."""
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    wh = b[:, 2:] - b[:, :2]
    return np.concatenate([b[:, :2] + wh / 2, wh], axis=1)


class BoxKalman:
    """Time-aware constant-velocity Kalman filter over `[cx, cy, w, h]` boxes.

    Args:
        measurement_noise: One standard deviation of a box edge's error, as a fraction of the
            box's width (x, w) or height (y, h). Larger trusts each box less (smoother tracks,
            slower to follow real turns).
        velocity_change: How much an object's velocity may change within one second, in box
            sizes per second (one standard deviation). Larger follows sudden turns and stops,
            but widens the gate, so neighbours are confused more easily.
        initial_speed: Speed uncertainty of a new track, in box sizes per second: how far a
            track may be found at its second sighting.
        velocity_memory_s: Time constant (seconds) over which the velocity estimate is
            forgotten while predicting; bounds the travel predicted over a long gap.
    """

    def __init__(
        self,
        *,
        measurement_noise: float,
        velocity_change: float,
        initial_speed: float,
        velocity_memory_s: float,
    ) -> None:
        self.measurement_noise = float(measurement_noise)
        self.velocity_change = float(velocity_change)
        self.initial_speed = float(initial_speed)
        self.velocity_memory_s = float(velocity_memory_s)

    # --- helpers --------------------------------------------------------------------

    def _scales(self, boxes: F64) -> tuple[F64, F64]:
        """Per-track `(N, 4)` measurement std and `(N, 4)` motion scale from `[cx, cy, w, h]`."""
        wh = np.maximum(boxes[:, 2:4], 1.0)
        meas = np.empty((len(boxes), 4))
        meas[:, :2] = wh
        meas[:, 2:] = wh
        meas *= self.measurement_noise
        motion = np.empty((len(boxes), 4))
        motion[:, :2] = np.sqrt(wh[:, :1] * wh[:, 1:])
        motion[:, 2:] = _SIZE_NOISE_RATIO * wh
        return meas, motion

    def measurement_cov(self, boxes: F64) -> F64:
        """`(N, 4, 4)` measurement covariance for boxes `[cx, cy, w, h]`."""
        meas, _ = self._scales(boxes)
        out = np.zeros((len(boxes), 4, 4))
        idx = np.arange(4)
        out[:, idx, idx] = meas**2
        return out

    def measurement_logdet(self, boxes: F64) -> F64:
        """`(N,)` log-determinant of the measurement covariance (the floor of `log det S`)."""
        wh = np.maximum(boxes[:, 2:4], 1.0) * self.measurement_noise
        return np.asarray(4.0 * np.log(wh).sum(axis=1))

    # --- filter ---------------------------------------------------------------------

    def initiate(self, boxes: F64) -> tuple[F64, F64]:
        """New tracks at `boxes (N, 4)` `[cx, cy, w, h]`, at rest with `initial_speed` uncertainty."""
        n = len(boxes)
        mean = np.zeros((n, 8))
        mean[:, :4] = boxes
        meas, motion = self._scales(boxes)
        var = np.concatenate([meas**2, (self.initial_speed * motion) ** 2], axis=1)
        cov = np.zeros((n, 8, 8))
        idx = np.arange(8)
        cov[:, idx, idx] = var
        return mean, cov

    def predict(self, mean: F64, cov: F64, dt: float) -> tuple[F64, F64]:
        """Advance every track by `dt` seconds; returns new `(mean, cov)`."""
        n = len(mean)
        if n == 0 or dt <= 0:
            return mean, cov
        tau = self.velocity_memory_s
        decay = math.exp(-dt / tau)
        gain = tau * (1.0 - decay)  # ≈ dt for dt ≪ tau, ≤ tau always
        f = np.eye(8)
        idx = np.arange(4)
        f[idx, idx + 4] = gain
        f[idx + 4, idx + 4] = decay
        _, motion = self._scales(mean[:, :4])
        q = (self.velocity_change * motion) ** 2  # (N, 4) velocity variance per second
        # Q = B(dt) ⊗ diag(q): white-noise acceleration, integrated over dt seconds.
        b = np.array([[dt**3 / 3.0, dt**2 / 2.0], [dt**2 / 2.0, dt]])
        pattern = (b[:, None, :, None] * _EYE4[None, :, None, :])[None]  # (1, 2, 4, 2, 4)
        qmat = (pattern * q[:, None, :, None, None]).reshape(n, 8, 8)
        return mean @ f.T, f @ cov @ f.T + qmat

    def innovation(self, mean: F64, cov: F64) -> tuple[F64, F64]:
        """Predicted boxes `(N, 4)` and innovation covariance `S (N, 4, 4)`."""
        return mean[:, :4], cov[:, :4, :4] + self.measurement_cov(mean[:, :4])

    def update(self, mean: F64, cov: F64, boxes: F64) -> tuple[F64, F64]:
        """Correct tracks `(N,)` with their matched boxes `(N, 4)` `[cx, cy, w, h]`."""
        if len(mean) == 0:
            return mean, cov
        pred, s = self.innovation(mean, cov)
        pht = cov[:, :, :4]  # P Hᵀ, (N, 8, 4)
        gain = np.linalg.solve(s, pht.transpose(0, 2, 1)).transpose(0, 2, 1)  # K = P Hᵀ S⁻¹
        mean = mean + np.einsum("nij,nj->ni", gain, boxes - pred)
        cov = cov - gain @ pht.transpose(0, 2, 1)
        cov = 0.5 * (cov + cov.transpose(0, 2, 1))
        return mean, cov

    def mahalanobis(self, mean: F64, cov: F64, boxes: F64) -> tuple[F64, F64]:
        """Squared Mahalanobis distances `(N, M)` of boxes `(M, 4)` to N tracks, and `log det S (N,)`.

        Only centre and size are compared (4 degrees of freedom).
        """
        pred, s = self.innovation(mean, cov)
        s_inv = np.linalg.inv(s)
        diff = boxes[None, :, :] - pred[:, None, :]  # (N, M, 4)
        d2 = np.einsum("nmi,nij,nmj->nm", diff, s_inv, diff)
        _, logdet = np.linalg.slogdet(s)
        return d2, logdet
