# Figures and tables of `snakemake --report report.html` (the QC plot is marked in qc.smk, the UMAP in embed.smk).

import json

# The manifest beside every corpus shard (cells, genes mapped, tokens, vocabulary).
CORPUS_MANIFESTS = [path.removesuffix(".parquet") + ".manifest.json" for path in get_corpus_shards()]


rule summarize_corpus:
    """Per-file table: cells kept and dropped by QC, genes mapped to the vocabulary, corpus cells and tokens."""
    input:
        qc=expand(rules.qc_dataset.output.summary, dataset=DATASETS),
        manifests=CORPUS_MANIFESTS,
    output:
        html=report(
            "results/report/corpus_summary.html",
            caption="../report/corpus_summary.rst",
            category="2. Corpus",
            labels={"figure": "corpus summary table"},
        ),
    log:
        "logs/summarize_corpus/all.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        gfw=GFW,
    shell:
        # The lists reach gfw through a pipe (printf is a shell builtin: no argument limit), not its command line.
        "printf '%s\\n' --qc-summary {input.qc:q} --manifest {input.manifests:q} "
        "| {params.gfw} plot corpus-summary @/dev/stdin -o {output.html:q} > {log:q} 2>&1"


rule plot_cell_lengths:
    """Histogram of tokens per cell in the corpus."""
    input:
        corpus=get_corpus_shards(),
        manifests=CORPUS_MANIFESTS,
    output:
        plot=report(
            "results/report/cell_lengths.png",
            caption="../report/cell_lengths.rst",
            category="2. Corpus",
            labels={"figure": "tokens per cell"},
        ),
    log:
        "logs/plot_cell_lengths/all.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        gfw=GFW,
    shell:
        "printf '%s\\n' {input.corpus:q} | {params.gfw} plot cell-lengths @/dev/stdin -o {output.plot:q} > {log:q} 2>&1"


rule plot_training_curves:
    """Training and validation loss, learning rate, throughput and step time from metrics.jsonl."""
    input:
        final=rules.pretrain_model.output.final,
    output:
        loss=report(
            "results/report/{model}/loss.png",
            caption="../report/loss.rst",
            category="3. Pretraining",
            labels={"figure": "loss curves", "model": "{model}"},
        ),
        throughput=report(
            "results/report/{model}/throughput.png",
            caption="../report/throughput.rst",
            category="3. Pretraining",
            labels={"figure": "throughput", "model": "{model}"},
        ),
    log:
        "logs/plot_training_curves/{model}.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        gfw=GFW,
        run_dir=subpath(input.final, parent=True),
    shell:
        "{params.gfw} plot training {params.run_dir} --loss {output.loss:q} --throughput {output.throughput:q} "
        "> {log:q} 2>&1"


rule write_run_configuration:
    """The run's configuration: workflow config, the training config the run used (config.yaml), model, run."""
    input:
        final=rules.pretrain_model.output.final,
        model_dir=rules.export_model.output.model_dir,
    output:
        html=report(
            "results/report/{model}/configuration.html",
            caption="../report/configuration.rst",
            category="5. Configuration",
            labels={"figure": "run configuration", "model": "{model}"},
        ),
    log:
        "logs/write_run_configuration/{model}.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        gfw=GFW,
        run_dir=subpath(input.final, parent=True),
        workflow_config=json.dumps(config),
    shell:
        "{params.gfw} plot configuration -o {output.html:q} --model-dir {input.model_dir:q} --run-dir {params.run_dir} "
        "--workflow-config {params.workflow_config:q} > {log:q} 2>&1"
