"""modes/metric_writer.py: the event file it writes is what TensorBoard reads back (scalars by
step, a PNG image grid), a process without a logdir writes none, and writing one imports no
TensorFlow."""

import io
import os
import sys
import textwrap

import numpy as np
from PIL import Image

from modes.metric_writer import MetricWriter, ProgressReport
from tests import run_utils


def test_tensorboard_reads_back_the_scalars_and_the_image(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  writer = MetricWriter(str(tmp_path))
  writer.write_scalars(1, {"loss": 0.5, "optimizer_updates": 1})
  writer.write_scalars(2, {"loss": 0.25, "optimizer_updates": 2})
  grid = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(1, 5, 7, 3)
  writer.write_images(2, {"samples": grid})
  report = ProgressReport(num_train_steps=3, writer=writer)
  for step in (1, 2, 3):  # reports at the last step only (well within 60 s)
    report(step, float(step))
  writer.close()

  names = os.listdir(tmp_path)
  assert len(names) == 1 and names[0].startswith("events.out.tfevents."), names
  reader = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  )
  reader.Reload()
  assert [(e.step, e.value) for e in reader.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
  assert [(e.step, e.value) for e in reader.Scalars("optimizer_updates")] == [(1, 1.0), (2, 2.0)]
  # The report: steps 1 -> 3 in 2 s of the given clock.
  assert [(e.step, e.value) for e in reader.Scalars("steps_per_sec")] == [(3, 1.0)]
  assert [e.step for e in reader.Scalars("uptime")] == [3]
  (image,) = reader.Images("samples")
  assert (image.step, image.height, image.width) == (2, 5, 7)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), grid[0]
  )


def test_without_a_logdir_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  writer = MetricWriter(None)
  writer.write_scalars(1, {"loss": 0.5})
  writer.write_images(1, {"samples": np.zeros((1, 4, 4, 1), np.uint8)})
  writer.close()
  assert os.listdir(tmp_path) == []


def test_writing_events_imports_no_tensorflow(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from modes import train
      from modes.metric_writer import MetricWriter
      writer = MetricWriter({str(tmp_path)!r})
      writer.write_scalars(1, {{"loss": 0.5}})
      writer.write_images(1, {{"samples": np.zeros((1, 4, 4, 1), np.uint8)}})
      writer.close()
      assert not {{"tensorflow", "clu"}} & set(sys.modules), "tensorflow or clu imported"
  """)
  run_utils.run_python([sys.executable, "-c", script], timeout=600)
  assert len(os.listdir(tmp_path)) == 1
