"""rtkit.engines: the networks (translators, generator, recognizers) behind one registry."""
from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
from rtkit.engines.errors import CheckpointError, EngineError, MissingDependency, RtkitError, optional_import
from rtkit.engines.registry import create, get_entry, list_models, model_spec, num_params, register_model
from rtkit.engines.spec import ModelSpec

__all__ = ["create", "list_models", "get_entry", "model_spec", "num_params", "register_model",
           "ModelSpec", "CheckpointError", "EngineError", "MissingDependency", "RtkitError",
           "optional_import", "read_checkpoint", "unwrap", "load_state_dict_strict"]
