"""Start-up checks of `config.story` (`modes.config_validation` applies them for --mode=story)."""

import ml_collections

from modes.config_checks import check_float, check_int, fail

BASELINES = ("ip",)  # story.baselines: optional extra fine-tunes beside AT and the control


def validate_story(config: ml_collections.ConfigDict) -> None:
  """One sentence for the first bad value of `config.story`."""
  from sampling.registry import METHODS

  st = config.story
  check_int(config, "story.clean_steps", 1)
  check_int(config, "story.clean_warmup_steps", 0)
  check_int(config, "story.clean_batch_size", 0)
  check_int(config, "story.num_samples", 3)  # the paired comparison needs 3 pairs
  if st.clean_weights and not st.clean_weights.endswith(".npz"):
    fail("story.clean_weights", st.clean_weights, "name a weights .npz or use '' (train it)")
  check_float(config, "story.clean_learning_rate", 0.0, float("inf"), low_open=True)
  if not st.methods or any(m not in METHODS or m == "consistency" for m in st.methods):
    fail("story.methods", st.methods, f"use a non-empty tuple of {list(METHODS[:-1])}")
  if not st.nfes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in st.nfes):
    fail("story.nfes", st.nfes, "use a non-empty tuple of positive integers")
  baselines = tuple(st.baselines)
  if any(b not in BASELINES for b in baselines) or len(set(baselines)) != len(baselines):
    fail("story.baselines", st.baselines, f"use () or a tuple of distinct names of {BASELINES}")
  check_float(config, "story.ip_gamma", 0.0, float("inf"), low_open=True)
  if not isinstance(st.estimate, bool):
    fail("story.estimate", st.estimate, "use True or False")
  check_int(config, "story.estimate_steps", 1)
