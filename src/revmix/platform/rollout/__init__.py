"""PPO rollouts: the training step, the engines that sample, the rewards that score."""
