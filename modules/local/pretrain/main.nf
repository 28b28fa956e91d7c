// Read-depth-aware masked pretraining with DeepSpeed ZeRO on every sample's Parquet shards.
//
// All GPUs of one task train together: with `accelerator N` (conf/gpu.config, --pretrain_gpus) the
// command runs under `torchrun --nproc_per_node N`. With --pretrain_nodes > 1 (Slurm only, see
// conf/slurm.config) the job spans several nodes and `srun` starts one rank per GPU instead; the task
// script then runs outside the container (the image has no Slurm client) and srun starts every rank in
// the image with apptainer/singularity when one of them is the container engine.
//
// The run directory (ZeRO checkpoints, logs) lives outside the work directory, under
// --pretrain_runs_dir (default <outdir>/pretrain/runs), in a folder named after what the run's math
// depends on: the shards (names and sizes), the vocabulary and the settings `scfm-pretrain` refuses to
// change on resume. A retry after preemption, or a later run with -resume or a larger --max_steps,
// finds that folder and continues from its newest complete checkpoint; different data or settings get
// a new folder. A preempted run exits 75 (also under torchrun, which reports 1 for its workers).
process PRETRAIN {
    tag "${shards.size()} shard dirs"
    label 'process_gpu'

    input:
    path shards, stageAs: 'shards/*', arity: '1..*'
    path vocab
    path init_checkpoint, stageAs: 'init/*'
    path deepspeed_config, stageAs: 'deepspeed/*'
    env('SCFM_PIPELINE_SESSION')

    output:
    // links to the run directory (ZeRO checkpoints for --resume, logs, curves) and to the final model in it
    // (Nextflow would publish only the enclosing folder of a path inside another output)
    path 'pretrain_run', emit: run
    path 'model', emit: checkpoint
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    def gpus = task.accelerator ? task.accelerator.request as int : 0
    def launcher = ''
    if (params.pretrain_nodes > 1) {
        def engine = workflow.containerEngine
        def binds = (params.container_mounts ? params.container_mounts.tokenize(',') : []).collect { dir -> "-B '${dir}'" }.join(' ')
        def in_image = engine ? "${engine} exec --nv ${binds} -B \"\$PWD\" --pwd \"\$PWD\" '${params.container}'" : ''
        launcher = "srun --kill-on-bad-exit=1 ${in_image}"
    }
    else if (gpus > 1) {
        launcher = "torchrun --standalone --nnodes 1 --nproc_per_node ${gpus} --no-python"
    }
    def shard_flags = shards.collect { dir -> "--shards '${dir}'" }.join(' ')
    def init = init_checkpoint ? "--init-checkpoint '${init_checkpoint}'" : ''
    def ds_config = deepspeed_config ? "--deepspeed-config '${deepspeed_config}'" : ''
    def identity = [params.model_preset, init_checkpoint ?: '', params.zero_stage, deepspeed_config ? deepspeed_config.name : '',
                    params.micro_batch_size, params.grad_accum, params.seed, gpus, params.pretrain_nodes, args].join(' ').replace("'", '')
    """
    # SCFM_PRETRAIN_RUNS_DIR: --pretrain_runs_dir, absolute (nextflow.config); not part of the cache key
    run_key=\$( { stat -L -c '%n %s' shards/*/*; cat '${vocab}' ${deepspeed_config ?: ''}; echo '${identity}'; } | sha256sum | cut -c1-16 )
    run_dir="\${SCFM_PRETRAIN_RUNS_DIR:?}/\${run_key}"
    mkdir -p "\${SCFM_PRETRAIN_RUNS_DIR}"
    status=0
    ${launcher} scfm-pretrain \\
        ${shard_flags} \\
        -o "\${run_dir}" \\
        --vocab '${vocab}' \\
        --model-preset ${params.model_preset} \\
        ${init} \\
        --zero-stage ${params.zero_stage} \\
        ${ds_config} \\
        --micro-batch-size ${params.micro_batch_size} \\
        --grad-accum ${params.grad_accum} \\
        --max-steps ${params.max_steps} \\
        --lr ${params.pretrain_lr} \\
        --warmup-steps ${params.warmup_steps} \\
        --save-every ${params.save_every} \\
        --seed ${params.seed} \\
        --quiet \\
        ${args} || status=\$?
    if [ -f "\${run_dir}/PREEMPTED" ]; then
        echo "pretraining was stopped after saving a checkpoint in \${run_dir}; a retry continues it" >&2
        exit 75
    fi
    [ \$status -eq 0 ] || exit \$status
    ln -sfn "\${run_dir}" pretrain_run
    ln -sfn "\${run_dir}/model" model

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        scfm: \$(scfm --version | sed 's/.* //')
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'from importlib.metadata import version; print(version("torch"))')
        deepspeed: \$(python3 -c 'from importlib.metadata import version; print(version("deepspeed"))')
    END_VERSIONS
    """

    stub:
    """
    mkdir -p pretrain_run/model
    touch pretrain_run/model/config.json pretrain_run/model/model.safetensors pretrain_run/model/vocab.tsv versions.yml
    ln -s pretrain_run/model model
    """
}
