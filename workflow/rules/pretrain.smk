rule pretrain_model:
    """Pretrain the masked-LM with torchrun (FSDP2 on CPU, see config/train/); resumes from its checkpoints.

    Only final.json is an output: the checkpoints beside it survive a failed or killed run, and the
    next run resumes from the latest one.
    """
    input:
        corpus=get_corpus_shards(),
        vocab=rules.build_vocabulary.output.vocab,
    output:
        final="results/pretrain/{model}/final.json",
    log:
        "logs/pretrain_model/{model}.log",
    benchmark:
        "logs/benchmarks/pretrain_model/{model}.tsv"
    params:
        python=PYTHON,
        scripts=SCRIPTS_DIR,
        run_dir=subpath(output.final, parent=True),
        config_dir=TRAIN_CONFIG_DIR,
        nproc=lookup(dpath="pretrain/nproc_per_node", within=config),
        corpus=lambda wildcards, input: ",".join(input.corpus),
        overrides=" ".join(f"'{o}'" for o in config["pretrain"]["overrides"]),
        max_length=PRESET_MAX_LENGTH,
    threads: lookup(dpath="pretrain/threads", within=config)
    resources:
        mem_mb=lookup(dpath="pretrain/mem_mb", within=config),
        runtime=lookup(dpath="pretrain/runtime", within=config),
        gpu=lookup(dpath="pretrain/gpus", within=config),
    conda:
        "../../envs/pretrain.yaml"
    shell:
        "PYTHONPATH={params.scripts}${{PYTHONPATH:+:$PYTHONPATH}} OMP_NUM_THREADS=1 "
        "{params.python} -m torch.distributed.run --standalone --nproc_per_node {params.nproc} "
        "-m geneformer_workflow train --config-dir {params.config_dir} --config-name {wildcards.model} "
        "'data.corpus=[{params.corpus}]' data.vocab_dir={input.vocab} data.max_length={params.max_length} "
        "run_dir={params.run_dir} {params.overrides} > {log} 2>&1"


rule export_model:
    """Export the final checkpoint as a Hugging Face BertForMaskedLM directory (+ tokenizer files)."""
    input:
        final=rules.pretrain_model.output.final,
        vocab=rules.build_vocabulary.output.vocab,
    output:
        model_dir=directory("results/export/{model}"),
    log:
        "logs/export_model/{model}.log",
    params:
        gfw=GFW,
        run_dir=subpath(input.final, parent=True),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/pretrain.yaml"
    shell:
        "{params.gfw} export {params.run_dir} {output.model_dir} --vocab-dir {input.vocab} > {log} 2>&1"
