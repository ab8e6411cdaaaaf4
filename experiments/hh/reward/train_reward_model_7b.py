"""Train the 7b HH reward model (the paper's settings); extra flags go to train_reward_model.py.

See train_reward_model.py for the accelerate launch line.
"""

import sys

from train_reward_model import main

if __name__ == "__main__":
    main(["--preset", "7b", *sys.argv[1:]])
