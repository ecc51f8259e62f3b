"""Federated LoRA fine-tuning, simulated in one process: ``rw.federate(model, method, clients)``.

Methods (:data:`METHODS`): ``fedavg`` (the FedAvg-of-LoRA baseline), and the catalogued ``ffa_lora``,
``fed_sb`` and ``fedsvd`` (:data:`FEDERATED_METHODS`). Clients are batch loaders; :func:`shard_dataset`
splits a classification dataset into disjoint client shards (IID or label-skewed).
"""

from .api import FEDERATED_METHODS, METHODS, FederatedConfig, FederatedResult, Federation, federate
from .rules import RULES, Rule, mean_state, svd_refactor
from .shards import shard_dataset, shard_indices

__all__ = [
    "FEDERATED_METHODS", "METHODS", "RULES", "FederatedConfig", "FederatedResult", "Federation", "Rule", "federate",
    "mean_state", "shard_dataset", "shard_indices", "svd_refactor",
]
