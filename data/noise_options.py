"""The label-noise choices the CLI offers, apart from `noise` (numpy, scipy, torch), so that
building the `noisyseg` parser imports none of them."""

NOISE_FAMILIES = ("erode-dilate", "coarse", "markov")
# ADELE Table 6: level L erodes/dilates LEVEL_ITERATIONS[L] times (annotation mIoU in the paper
# 1.00, 0.91, 0.73, 0.61, 0.52, 0.39, 0.28).
LEVEL_ITERATIONS = (0, 1, 2, 3, 4, 6, 8)
# The splits `data corrupt --splits` may corrupt: train, and val for selecting the checkpoint on
# validation masks as noisy as a user's (the test split always stays clean).
NOISY_SPLITS = ("train", "val")
