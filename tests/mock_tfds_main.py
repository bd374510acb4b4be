"""`main.py` with TFDS mocked by `tfds.testing.mock_data`: end-to-end runs on TFDS datasets
(random images and labels of the real feature spec) without prepared data.

  python -m tests.mock_tfds_main --config=... --workdir=... [any flag of main.py]

$MOCK_TFDS_EXAMPLES sets the number of examples per split (default 24).
"""

import os

import tensorflow_datasets as tfds

from modes import cli

if __name__ == "__main__":
  with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_TFDS_EXAMPLES", "24"))):
    cli.run()
