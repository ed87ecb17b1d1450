# The training store (results/store/): the corpus in the layout the trainer memory-maps (uint16 token ids, int64
# offsets), built by CPU jobs, one part per corpus shard (written by tokenize_dataset, tokenize.smk, right after the
# shard), plus an index over them. Every model size trained on this
# corpus opens the same store; the pretraining job never builds it (geneformer_workflow/tokenize/store.py, docs/training.md).
# STORE_INDEX and get_store_parts are in common.smk.


rule list_store_parts:
    """The store's parts in corpus order, one per line. The list reaches store_index through this file: a shell
    command is one argument to the shell, and Linux caps one argument at 128 KiB (a few thousand paths)."""
    input:
        get_store_parts,
    output:
        parts="results/store/parts.txt",
    log:
        "logs/list_store_parts/all.log",
    localrule: True
    run:
        Path(output.parts).write_text("".join(f"{part}\n" for part in input))


rule store_index:
    """The store's index: its parts in order, cells and tokens per split, content checksums (paths relative).

    Its one input is the list: a part remade makes the list newer (list_store_parts reruns), so the index follows,
    and the parts are not each an edge of the DAG again (planning cost, docs/scale.md).
    """
    input:
        listing=rules.list_store_parts.output.parts,
    output:
        index=STORE_INDEX,
    log:
        "logs/store_index/all.log",
    conda:
        "../../envs/tokenize.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        gfw=GFW,
    shell:
        "{params.gfw} store index --parts-list {input.listing:q} -o {output.index:q} > {log:q} 2>&1"
