"""A Kalman filter for boxes whose motion is driven by elapsed media seconds, batched over tracks.

State per track, pixels and pixels per second:

    mean = [cx, cy, w, h, vx, vy, vw, vh]                               (N, 8)
    cov  = [[var cx, var cy, var w, var h],          position variance   (N, 3, 4)
            [cov(cx, vx), …,        cov(h, vh)],     position–velocity
            [var vx, var vy, var vw, var vh]]        velocity variance

Every matrix of the model (transition, process noise, measurement, measurement noise) acts on
each coordinate and its velocity alone, so the 8×8 covariance is four independent 2×2 blocks
and stays so exactly. Only their three distinct entries are kept (`cov` above; `dense_cov`
gives the 8×8 matrix), the innovation covariance `S` is diagonal, and predict, gate and update
are closed-form elementwise formulas: a few numpy calls for all tracks, no matrix inverses.

Two choices make it hold at 1–2 updates per second as well as at 30:

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
# Squared motion scale relative to `_motion_sizes2` for cx, cy, w, h.
_MOTION_RATIO2 = np.array([1.0, 1.0, _SIZE_NOISE_RATIO**2, _SIZE_NOISE_RATIO**2])
# Column picks (`take` is the cheapest gather on small arrays).
_WHWH = np.array([0, 1, 0, 1])
_WWWH, _HHWH = np.array([0, 0, 0, 1]), np.array([1, 1, 0, 1])  # w·h, w·h, w·w, h·h
_KP_KP_KV, _P_PV_PV = np.array([0, 0, 1]), np.array([0, 1, 1])


def xyxy_to_cxcywh(xyxy: NDArray[np.floating]) -> F64:
    """`(N, 4)` x1, y1, x2, y2 → `(N, 4)` centre x, centre y, width, height (float64)."""
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    wh = b[:, 2:] - b[:, :2]
    return np.concatenate([b[:, :2] + wh / 2, wh], axis=1)


class BoxKalman:
    """Time-aware constant-velocity Kalman filter over `[cx, cy, w, h]` boxes.

    Args:
        measurement_noise: One standard deviation of the error of a box's centre and of its
            size, as a fraction of the box's width (cx, w) or height (cy, h); the same for both,
            a simplification (independent edge errors would make the centre's √2 smaller and
            the size's √2 larger). Larger trusts each box less (smoother tracks, slower to
            follow real turns).
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

    # --- noise ----------------------------------------------------------------------

    def measurement_var(self, boxes: F64) -> F64:
        """`(N, 4)` measurement variances (the diagonal of R) for boxes `[cx, cy, w, h]`."""
        std = np.maximum(boxes[:, 2:4], 1.0).take(_WHWH, axis=1) * self.measurement_noise
        return std * std

    def _motion_sizes2(self, boxes: F64) -> F64:
        """`(N, 4)` squared motion size of boxes `[cx, cy, w, h]`, before `_MOTION_RATIO2`.

        Centres move in box sizes `sqrt(w · h)`, so their square is the box area; sizes change
        in their own side (`w`, `h`), `_SIZE_NOISE_RATIO` as fast.
        """
        wh = np.maximum(boxes[:, 2:4], 1.0)
        return wh.take(_WWWH, axis=1) * wh.take(_HHWH, axis=1)

    # --- filter ---------------------------------------------------------------------

    def initiate(self, boxes: F64) -> tuple[F64, F64]:
        """New tracks at `boxes (N, 4)` `[cx, cy, w, h]`, at rest with `initial_speed` uncertainty."""
        n = len(boxes)
        mean = np.zeros((n, 8))
        mean[:, :4] = boxes
        cov = np.zeros((n, 3, 4))
        cov[:, 0] = self.measurement_var(boxes)
        cov[:, 2] = self._motion_sizes2(boxes) * (self.initial_speed**2 * _MOTION_RATIO2)
        return mean, cov

    def predict(self, mean: F64, cov: F64, dt: float) -> tuple[F64, F64]:
        """Advance every track by `dt` seconds; returns new `(mean, cov)`."""
        if len(mean) == 0 or dt <= 0:
            return mean, cov
        tau = self.velocity_memory_s
        decay = math.exp(-dt / tau)
        gain = tau * (1.0 - decay)  # ≈ dt for dt ≪ tau, ≤ tau always
        # Each coordinate and its velocity: [p, v]' = F [p, v] with F = [[1, gain], [0, decay]],
        # and P' = F P Fᵀ + Q per 2×2 block, written on the rows (var p, cov pv, var v) of
        # `cov`. Q = q · [[dt³/3, dt²/2], [dt²/2, dt]] is white-noise acceleration of
        # variance q per second, integrated over dt.
        f = np.array([[1.0, gain], [0.0, decay]])
        f_cov = np.array([[1.0, 2.0 * gain, gain * gain], [0.0, decay, decay * gain], [0.0, 0.0, decay * decay]])
        q_shape = np.array([[dt**3 / 3.0], [dt**2 / 2.0], [dt]]) * (self.velocity_change**2 * _MOTION_RATIO2)
        q = q_shape * self._motion_sizes2(mean[:, :4])[:, None, :]
        return (f @ mean.reshape(-1, 2, 4)).reshape(-1, 8), f_cov @ cov + q

    def innovation(self, mean: F64, cov: F64) -> tuple[F64, F64, F64]:
        """Predicted boxes `(N, 4)`, innovation variances `(N, 4)` (S is diagonal) and `spread (N,)`.

        `spread = log det S − log det R`: how much less sure the prediction is than a box
        (0 for a perfectly known track; grows with the time the track went unseen).
        """
        boxes = mean[:, :4]
        r = self.measurement_var(boxes)
        s = cov[:, 0] + r
        return boxes, s, np.log(s / r).sum(axis=1)

    def update(self, mean: F64, cov: F64, boxes: F64, s: F64 | None = None) -> tuple[F64, F64]:
        """Correct tracks `(N,)` with their matched boxes `(N, 4)` `[cx, cy, w, h]`.

        `s` is their innovation variances from `innovation`, when already computed.
        """
        if len(mean) == 0:
            return mean, cov
        if s is None:
            s = self.innovation(mean, cov)[1]
        gain = cov[:, :2] / s[:, None, :]  # K = P Hᵀ S⁻¹: rows (position, velocity), (N, 2, 4)
        residual = (boxes - mean[:, :4])[:, None, :]
        mean = mean + (gain * residual).reshape(-1, 8)
        # P' = P − K H P: var p −= Kp · var p, cov pv −= Kp · cov pv, var v −= Kv · cov pv.
        cov = cov - gain.take(_KP_KP_KV, axis=1) * cov.take(_P_PV_PV, axis=1)
        return mean, cov

    def mahalanobis(self, pred: F64, s: F64, boxes: F64) -> F64:
        """Squared Mahalanobis distances `(N, M)` of boxes `(M, 4)` to N predictions.

        `pred, s` come from `innovation`. Only centre and size are compared (4 degrees of freedom).
        """
        diff = boxes[None, :, :] - pred[:, None, :]  # (N, M, 4)
        return np.asarray(((diff * diff) @ (1.0 / s)[:, :, None])[:, :, 0])

    @staticmethod
    def dense_cov(cov: F64) -> F64:
        """The full `(N, 8, 8)` covariance over `[cx, cy, w, h, vx, vy, vw, vh]` from `cov (N, 3, 4)`."""
        out = np.zeros((len(cov), 8, 8))
        i = np.arange(4)
        out[:, i, i], out[:, i, i + 4], out[:, i + 4, i], out[:, i + 4, i + 4] = (
            cov[:, 0], cov[:, 1], cov[:, 1], cov[:, 2]
        )
        return out
