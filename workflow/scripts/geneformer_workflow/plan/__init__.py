"""Planning of the workflow's DAG: what ``workflow/rules/common.smk`` computes when Snakemake parses the workflow.

``inputs`` (the input files, the config's paths and each file's row-range shards, with a cache so that planning
does not open every file), ``pretrain`` (the training config's name, the pretraining job's shape and launch, the
trainer's overrides) and ``evaluation`` (the evaluation stage's datasets and options). ``common.smk`` imports this
package once; it needs only the standard library, except the header reads of new inputs (h5py), without which
every file is one shard.
"""
