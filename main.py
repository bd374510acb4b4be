"""Entry point: python main.py --config=configs/<name>.py --workdir=DIR [--mode=MODE].

Any config key can be overridden, e.g. --config.train.batch_size=32; the flags are in
`modes/cli.py` (installed as the console script `adv-diffusion` by `pip install -e .`).
"""

from modes import cli

if __name__ == "__main__":
  cli.run()
