# Cell-type evaluation (evaluate: in config/config.yaml): each annotated file is embedded by this run's model, its
# random-weight twin, a PCA baseline and the listed Geneformer checkpoints, and every embedding is scored.


wildcard_constraints:
    evaluation="|".join(map(re.escape, EVALUATIONS)) if EVALUATIONS else "NONE",


rule evaluate_embeddings:
    """Scores (kNN, linear probe, Leiden ARI/NMI, silhouettes) of every model's embedding of one annotated file."""
    input:
        h5ad=get_evaluation_h5ad,
        model_dir=expand(rules.export_model.output.model_dir, model=MODEL),
        checkpoints=get_checkpoint_files(),
    output:
        scores="results/evaluate/{evaluation}/scores.tsv",
        embeddings="results/evaluate/{evaluation}/embeddings.h5ad",
        table=report(
            "results/evaluate/{evaluation}/scores.html",
            caption="../report/evaluation_table.rst",
            category="6. Evaluation",
            labels={"figure": "scores table", "dataset": "{evaluation}"},
        ),
        umap=report(
            "results/evaluate/{evaluation}/umap_by_label.png",
            caption="../report/evaluation_umap.rst",
            category="6. Evaluation",
            labels={"figure": "UMAP by cell type", "dataset": "{evaluation}"},
        ),
    log:
        "logs/evaluate_embeddings/{evaluation}.log",
    benchmark:
        "logs/benchmarks/evaluate_embeddings/{evaluation}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        gfw=GFW,
        options=get_evaluation_options,
    shell:
        "{params.gfw} evaluate {input.h5ad:q} {params.options} --scores {output.scores:q} "
        "--embeddings {output.embeddings:q} --table {output.table:q} --umap {output.umap:q} > {log:q} 2>&1"
