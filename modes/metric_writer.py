"""The train loop's metrics: logged as "[step] name=value, ..." lines and, on the main process,
written as a TensorBoard event file (scalars and image grids), without importing TensorFlow.

clu's writers and progress report import TensorFlow to write the same events, which costs every
training process seconds of start-up; the event file format itself is small (TFRecord framing
of `Event` protos, as tensorboard's own `EventFileWriter` writes them; that class goes through
tensorboard's TensorFlow shim, which imports TensorFlow whenever it is installed).
"""

import io
import os
import socket
import struct
import time
from typing import Callable, Mapping

import numpy as np
from absl import logging


class MetricWriter:
  """Logs scalars; with a `logdir`, also appends them and images to one event file there
  (tensorboard's protos are imported then only: processes that write no events need none)."""

  def __init__(self, logdir: str | None):
    self._file = None
    if logdir is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

      self._event, self._summary, self._crc = event_pb2.Event, summary_pb2.Summary, masked_crc32c
      os.makedirs(logdir, exist_ok=True)
      name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
      self._file = open(os.path.join(logdir, name), "ab")
      self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    """One TFRecord: length, its masked CRC-32C, the serialised `Event`, its masked CRC-32C."""
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", self._crc(header)))
    self._file.write(data + struct.pack("<I", self._crc(data)))

  def _add(self, step: int, values: Callable[[type], list]) -> None:
    """Appends the summary values `values(Summary)` at `step` (made only when writing)."""
    if self._file is not None:
      summary = self._summary(value=values(self._summary))
      self._write(self._event(wall_time=time.time(), step=step, summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    text = [
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())
    ]
    logging.info("[%d] %s", step, ", ".join(text))
    self._add(
        step,
        lambda summary: [summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()],
    )

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """`images`: name -> uint8 (1, H, W, C) with C in {1, 3}, stored as PNG."""
    if self._file is None:
      return
    from PIL import Image

    encoded = {}
    for tag, batch in images.items():
      image = np.asarray(batch)[0]
      png = io.BytesIO()
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
      encoded[tag] = (image.shape, png.getvalue())

    def values(summary):
      return [
          summary.Value(
              tag=tag,
              image=summary.Image(height=h, width=w, colorspace=c, encoded_image_string=data),
          )
          for tag, ((h, w, c), data) in encoded.items()
      ]

    self._add(step, values)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class ProgressReport:
  """After step s: logs steps/s and percentage done, and writes "steps_per_sec" and "uptime"
  (seconds since it was made), every `every_secs` seconds and at the last step."""

  def __init__(self, num_train_steps: int, writer: MetricWriter, every_secs: float = 60.0):
    self._num_steps, self._writer, self._every_secs = num_train_steps, writer, every_secs
    self._t0 = time.monotonic()
    self._previous: tuple[int, float] | None = None  # the step and time it last reported at

  def __call__(self, step: int, t: float) -> None:
    if self._previous is None:
      self._previous = (step, t)
      return
    last_step, last_time = self._previous
    if step == last_step or (t - last_time <= self._every_secs and step != self._num_steps):
      return
    steps_per_sec = (step - last_step) / max(t - last_time, 1e-9)
    eta = (self._num_steps - step) / max(steps_per_sec, 1e-9)
    logging.info(
        "%.1f steps/s, %.1f%% (%d/%d), ETA: %dm",
        steps_per_sec,
        100 * step / self._num_steps,
        step,
        self._num_steps,
        int(eta / 60),
    )
    self._writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
    self._writer.write_scalars(step, {"uptime": time.monotonic() - self._t0})
    self._previous = (step, t)
