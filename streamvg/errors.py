"""StreamVG's errors: one tree, so callers catch at the level they can act on.

```
StreamVGError                 anything StreamVG raises on purpose (a user-facing sentence)
├── ConfigError               a pipeline file, option or environment value is wrong (.field)
├── SourceError               a video file or camera cannot be read (.source, masked)
│   ├── SourceNotFoundError   the file does not exist / the device is absent
│   ├── UnsupportedSourceError  not a video, unknown scheme or codec
│   └── SourceTimeoutError    a camera never answered
├── GroundingError            the grounding engine failed
│   ├── ModelLoadError        a model directory / hub id cannot be loaded (.model)
│   ├── EngineUnavailableError  the asked engine needs something not installed (TensorRT, GPU)
│   ├── GroundingCancelled    a batch stopped part-way because the run is stopping
│   └── AnswerParseError      a model answer could not be parsed (counted, window skipped)
├── TrackingError             boxes or times given to a tracker are unusable (also ValueError)
└── PublishError              events could not be published
    ├── RedisAuthError        Redis refused the credentials
    └── MqttAuthError         an MQTT broker refused the credentials
```

Every message is one sentence that names the input, says what is wrong and what to do.
Foreign errors (av, redis, transformers) are translated at the seam where they enter,
with `raise … from exc`, so the cause stays on the traceback for developers while the CLI
shows only the sentence.
"""

from __future__ import annotations

__all__ = [
    "AnswerParseError",
    "ConfigError",
    "EngineUnavailableError",
    "GroundingCancelled",
    "GroundingError",
    "ModelLoadError",
    "MqttAuthError",
    "PublishError",
    "RedisAuthError",
    "SourceError",
    "SourceNotFoundError",
    "SourceTimeoutError",
    "StreamVGError",
    "TrackingError",
    "UnsupportedSourceError",
]


class StreamVGError(Exception):
    """Base of every error StreamVG raises on purpose; its message is meant for users."""


class ConfigError(StreamVGError, ValueError):
    """A pipeline file, command-line option or environment value is invalid.

    Attributes:
        field: Dotted path of the offending field (`sources[1].uri`), when known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SourceError(StreamVGError):
    """A video file or camera could not be opened or read.

    Attributes:
        source: The URI or path, with any password masked.
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The file does not exist or the device is absent."""


class UnsupportedSourceError(SourceError):
    """The input is not a video StreamVG can decode (not a video, unknown scheme or codec)."""


class SourceTimeoutError(SourceError, TimeoutError):
    """A camera did not answer within the allowed time."""


class GroundingError(StreamVGError):
    """The grounding engine failed."""


class ModelLoadError(GroundingError):
    """A model directory or hub id could not be loaded.

    Attributes:
        model: The directory or hub id given.
    """

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class EngineUnavailableError(GroundingError):
    """The asked engine needs something not present here (TensorRT, a GPU, a package)."""


class GroundingCancelled(GroundingError):
    """A batch was stopped part-way (between generated tokens) because the run is stopping;
    its answers are discarded, and the windows count neither as grounded nor as failed."""


class AnswerParseError(GroundingError):
    """A model answer could not be parsed into boxes."""


class TrackingError(StreamVGError, ValueError):
    """Detections or a time given to a tracker are unusable (NaN boxes, x2 < x1, time going back)."""


class PublishError(StreamVGError):
    """Events could not be published."""


class RedisAuthError(PublishError):
    """Redis refused the username/password given in the URL."""


class MqttAuthError(PublishError):
    """An MQTT broker refused the username/password given in the URL."""
