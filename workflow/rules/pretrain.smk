rule pretrain_model:
    """Pretrain the masked-LM with torchrun (FSDP2 on CPU, see config/train/); resumes from its checkpoints.

    It opens the training store (store.smk) that CPU jobs built, shared by every model size; the corpus
    reaches it as the store's one index path, never as a list of shards on the command line.

    Only final.json is an output: the checkpoints beside it survive a failed, killed or preempted job,
    and the next attempt resumes from the latest one. The job shape (nodes, GPUs, CPUs, memory, time)
    comes from pretrain.sizes for the model size. Inside a SLURM job (the SLURM executor's jobs) srun
    starts workflow/scripts/torchrun_node.sh once per node, and they meet at a c10d rendezvous; on one
    machine it runs torchrun --standalone (docs/slurm.md).
    """
    input:
        store=rules.store_index.output.index,
        vocab=rules.build_vocabulary.output.vocab,
    output:
        final="results/pretrain/{model}/final.json",
    log:
        "logs/pretrain_model/{model}.log",
    benchmark:
        "logs/benchmarks/pretrain_model/{model}.tsv"
    conda:
        "../../envs/pretrain.yaml"
    threads: PRETRAIN_JOB["cpus_per_node"]
    resources:
        # Per node: SLURM's --mem is per node, and every node runs the same share of the work.
        mem_mb=PRETRAIN_JOB["mem_mb"],
        runtime=PRETRAIN_JOB["runtime"],
        nodes=PRETRAIN_JOB["nodes"],
        gres=PRETRAIN_JOB["gres"],
        # The SLURM executor runs the job's shell directly in the batch step instead of under `srun -n1`,
        # so the shell's own srun gets the whole allocation and SLURM's signals reach only the training step.
        mpi="srun",
        tasks_per_node=PRETRAIN_JOB["tasks_per_node"],
        cpus_per_task=PRETRAIN_JOB["cpus_per_task"],
    params:
        python=PYTHON,
        scripts=SCRIPTS_DIR,
        launch=get_pretrain_launch,
        node_launcher=SCRIPTS_DIR / "torchrun_node.sh",
        nproc=PRETRAIN_JOB["nproc_per_node"],
        config_dir=TRAIN_CONFIG_DIR,
        overrides=lambda wildcards, input, output: shlex.join(
            get_pretrain_overrides(input.store, input.vocab, subpath(output.final, parent=True))
        ),
    shell:
        "PYTHONPATH={params.scripts:q}${{PYTHONPATH:+:$PYTHONPATH}} OMP_NUM_THREADS=1 "
        "{params.launch} bash {params.node_launcher:q} {resources.nodes} {params.nproc} {params.python} "
        "-m geneformer_workflow train --config-dir {params.config_dir:q} --config-name {wildcards.model} "
        "{params.overrides} > {log:q} 2>&1\n"
        # A stop signal (time limit, preemption) ends training with a checkpoint and exit code 0 but no
        # final.json: fail the job with a clear message, so that a retry (or rerun) resumes.
        "test -s {output.final:q} || {{ echo 'pretrain_model: stopped before training.max_steps (stop signal);"
        " a checkpoint was saved and the next attempt resumes from it' | tee -a {log:q} >&2; exit 1; }}"


rule export_model:
    """Export the final checkpoint as a Hugging Face BertForMaskedLM directory (+ tokenizer files)."""
    input:
        final=rules.pretrain_model.output.final,
        vocab=rules.build_vocabulary.output.vocab,
    output:
        model_dir=directory("results/export/{model}"),
    log:
        "logs/export_model/{model}.log",
    conda:
        "../../envs/pretrain.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        gfw=GFW,
        run_dir=subpath(input.final, parent=True),
    shell:
        "{params.gfw} export {params.run_dir:q} {output.model_dir:q} --vocab-dir {input.vocab:q} > {log:q} 2>&1"
