"""Configs YAML cannot express, in Hydra's config store (Hydra imports every hydra_plugins module first)."""

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# An empty mapping that accepts new keys: Hydra's struct mode refuses `a.b.new=1` for a key no config declares
# unless the node's own struct flag is off, which a YAML file cannot say (conf/strategy/grouped.yaml uses it
# for combine_settings, whose keys are those of the method chosen).
open_mapping = OmegaConf.create({})
OmegaConf.set_struct(open_mapping, False)
ConfigStore.instance().store(name="mtlrun_open_mapping", node=open_mapping)
