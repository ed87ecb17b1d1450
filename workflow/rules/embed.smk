rule embed_cells:
    """Per-cell embeddings of every corpus cell from the exported model (mean over gene tokens; <cls> for v2)."""
    input:
        model_dir=rules.export_model.output.model_dir,
        corpus=CORPUS_LIST,
    output:
        h5ad="results/embed/{model}/cells.h5ad",
    log:
        "logs/embed_cells/{model}.log",
    benchmark:
        "logs/benchmarks/embed_cells/{model}.tsv"
    conda:
        "../../envs/embed.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        gfw=GFW,
        # embed.hidden_state (transformers' numbering) when set, else Geneformer EmbExtractor's emb_layer
        layer=(
            f"--hidden-state {config['embed']['hidden_state']}"
            if config["embed"]["hidden_state"] is not None
            else f"--geneformer-emb-layer {config['embed']['geneformer_emb_layer']}"
        ),
        batch_size=lookup(dpath="embed/batch_size", within=config),
    shell:
        "{params.gfw} embed --model {input.model_dir:q} {input.corpus:q} -o {output.h5ad} "
        "{params.layer} --batch-size {params.batch_size} > {log:q} 2>&1"


rule plot_cell_embeddings:
    """UMAP (scanpy) of the mean cell embeddings, coloured by total counts and tokens per cell."""
    input:
        h5ad=rules.embed_cells.output.h5ad,
        qc=expand(rules.qc_dataset.output.cells, dataset=DATASETS),
    output:
        umap=report(
            "results/embed/{model}/umap.png",
            caption="../report/umap.rst",
            category="4. Cell embeddings",
            labels={"figure": "UMAP of the cell embeddings", "model": "{model}"},
        ),
    log:
        "logs/plot_cell_embeddings/{model}.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        gfw=GFW,
    shell:
        # The QC tables reach gfw through a pipe (printf is a shell builtin: no argument limit), not its command line.
        "printf '%s\\n' --qc {input.qc:q} | {params.gfw} plot umap {input.h5ad:q} -o {output.umap:q} @/dev/stdin "
        "> {log:q} 2>&1"
