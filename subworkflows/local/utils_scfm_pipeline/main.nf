/*
 * Start and end of an scfm pipeline run: help, parameter and samplesheet checks, the parameter
 * summary, and what happens once the run is over. Every check runs before any task starts.
 */

include { helpText; parameterProblems; parameterSummary; readJson; readSamplesheet } from '../utils_schema'

workflow PIPELINE_INITIALISATION {
    main:
    def schema = readJson("${projectDir}/nextflow_schema.json")
    if (params.help) {
        log.info(helpText(schema, 'nextflow run . -profile test,local --outdir results', params.help instanceof String ? params.help : null))
        exit(0)
    }

    def problems = parameterProblems(schema, params, workflow.launchDir)
    if (!problems) {
        problems = modeProblems()
    }
    failOn(problems)

    def sheet = readSamplesheet(params.input, "${projectDir}/assets/schema_input.json")
    failOn(sheet.problems)
    def rows = sheet.rows
    failOn(finetuneSampleProblems(rows))
    if (workflow.containerEngine) {
        failOn(createContainerMounts())
    }

    log.info("scfm ${workflow.manifest.version}: ${rows.size()} sample(s) from ${params.input}, mode ${params.mode}, results in ${params.outdir}")
    def summary = parameterSummary(schema, params)
    if (summary) {
        log.info("Parameters that differ from their defaults:\n${summary}")
    }

    emit:
    samples = channel.fromList(rows)
}

workflow PIPELINE_COMPLETION {
    take:
    mlflow_uri

    main:
    workflow.onComplete = {
        log.info("scfm ${workflow.success ? 'finished' : 'failed'}: results in ${params.outdir}, MLflow store ${mlflow_uri}")
    }
}

// One line for one problem; several are joined on one line, so the first screen says everything.
def failOn(problems) {
    if (problems) {
        error(problems.size() == 1 ? problems[0] : "${problems.size()} problems: ${problems.join('; ')}")
    }
}

// Flag combinations the JSON schema cannot express.
def modeProblems() {
    def problems = []
    if (params.mode == 'embed' && !params.checkpoint && !params.classifier) {
        problems << "--mode embed needs --checkpoint (a checkpoint directory or the official models.ckpt) or --classifier"
    }
    if (params.mode == 'finetune' && !params.checkpoint) {
        problems << "--mode finetune needs --checkpoint (a checkpoint directory or the official models.ckpt)"
    }
    if (params.mode == 'finetune' && !params.label_key) {
        problems << "--mode finetune needs --label_key: the obs column holding the cell-type labels"
    }
    if (params.reference && !params.label_key) {
        problems << "--reference needs --label_key: the obs column of the reference holding its labels"
    }
    if (params.perturbation_key && params.mode != 'pretrain' && !params.checkpoint) {
        problems << "--perturbation_key needs --checkpoint (its gene context embeddings), or --mode pretrain"
    }
    if (params.gene_modules && params.mode != 'pretrain' && !params.checkpoint) {
        problems << "--gene_modules needs --checkpoint (its decoder's gene embeddings), or --mode pretrain"
    }
    if ((params.tf_list || params.go_db || params.gene_modules_groupby) && !params.gene_modules) {
        problems << "--tf_list, --go_db and --gene_modules_groupby take effect with --gene_modules"
    }
    if (params.classifier && params.reference) {
        problems << "--classifier and --reference are two ways to annotate: give one"
    }
    if (params.classifier && params.mode != 'embed') {
        problems << "--classifier is used with --mode embed (--mode ${params.mode} trains its own classifier when --label_key is given)"
    }
    def official = params.checkpoint && params.checkpoint.toString().endsWith('.ckpt')
    if (official && !params.vocab && params.mode != 'pretrain') {
        problems << "--checkpoint ${params.checkpoint} has no vocabulary inside: give --vocab (e.g. OS_scRNA_gene_index.19264.tsv)"
    }
    ['checkpoint', 'classifier'].each { name ->
        def model = params.get(name) ? file(params.get(name)) : null
        if (model && model.isDirectory() && !model.resolve('vocab.tsv').exists()) {
            problems << "--${name} ${params.get(name)} has no vocab.tsv: a checkpoint directory holds config.json, model.safetensors and vocab.tsv"
        }
    }
    if (params.pretrain_nodes > 1 && !(params.pretrain_gpus > 0)) {
        problems << "--pretrain_nodes ${params.pretrain_nodes} needs --pretrain_gpus > 0 (ranks per node)"
    }
    if (params.pretrain_nodes > 1 && workflow.containerEngine in ['docker', 'podman']) {
        problems << "--pretrain_nodes ${params.pretrain_nodes} runs each rank with srun, which starts apptainer or singularity images, not ${workflow.containerEngine} ones: use -profile apptainer or singularity"
    }
    return problems
}

// A bind mount needs its source: the folders tasks write outside their work directories (the SQLite
// store's, the pretraining runs directory; conf/containers.config) exist before any task starts.
def createContainerMounts() {
    def folders = params.container_mounts ? params.container_mounts.toString().tokenize(',') : []
    return folders.findAll { dir -> !file(dir).mkdirs() && !file(dir).isDirectory() }
        .collect { dir -> "--container_mounts: cannot create ${dir}" }
}

// --finetune_sample a,b restricts fine-tuning to those samples; unset, every sample is used
def finetuneSamples() {
    return params.finetune_sample ? params.finetune_sample.toString().tokenize(',').collect { id -> id.trim() } : []
}

def finetuneSampleProblems(rows) {
    def ids = rows.collect { row -> row[0].id }
    def unknown = finetuneSamples().findAll { id -> !(id in ids) }
    return unknown ? ["--finetune_sample ${unknown.join(',')} is not a sample of ${params.input}"] : []
}
