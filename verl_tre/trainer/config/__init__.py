"""Hydra configs of verl_tre.trainer.main_ppo (a package so that Hydra can find them by module name)."""
