/*
 * scfm: QC -> ALIGN -> (PRETRAIN | FINETUNE | neither) -> EMBED -> ANNOTATE -> REPORT
 *
 * --mode embed     embed with --checkpoint; with --classifier, embed with the classifier's own encoder
 *                  (the weights its head was trained on) and annotate with its head
 * --mode finetune  fine-tune a classifier from --checkpoint on the labelled cells of every sample (--label_key;
 *                  --finetune_sample a,b restricts it to named samples), then embed with it and annotate
 * --mode pretrain  build a vocabulary (or take --vocab), write shards, pretrain, embed with the new
 *                  checkpoint; with --label_key also fine-tune a classifier from it and annotate
 *
 * Annotation runs when a classifier is given (--classifier) or produced (FINETUNE), or with a
 * reference (--reference + --label_key). With --drug_model (from `scfm drug adapt`), DRUG_RESPONSE scores
 * every cell for --drugs (default: all of the model's). Reports: one per batch and one for all samples.
 * --perturbation_key adds PERTURB (perturbation response on the aligned samples, with the base
 * checkpoint's gene context embeddings); the all-samples report shows its section.
 * --gene_modules adds GENE_MODULES per sample (and GENE_NETWORK with --tf_list) with the base
 * checkpoint's decoder, summarised in the all-samples report.
 */

include { MLFLOW_INIT              } from '../modules/local/mlflow_init'
include { MLFLOW_FINISH            } from '../modules/local/mlflow_finish'
include { QC                       } from '../modules/local/qc'
include { VOCAB_BUILD              } from '../modules/local/vocab'
include { ALIGN                    } from '../modules/local/align'
include { PRETRAIN                 } from '../modules/local/pretrain'
include { FINETUNE                 } from '../modules/local/finetune'
include { EMBED                    } from '../modules/local/embed'
include { ANNOTATE                 } from '../modules/local/annotate'
include { DRUG_RESPONSE            } from '../modules/local/drug_response'
include { PERTURB                  } from '../modules/local/perturb'
include { GENE_MODULES             } from '../modules/local/gene_modules'
include { GENE_NETWORK             } from '../modules/local/gene_network'
include { REPORT as REPORT_BATCH   } from '../modules/local/report'
include { REPORT as REPORT_ALL     } from '../modules/local/report'

workflow SCFM {
    take:
    samples          // channel: [ meta (id, batch, condition), counts file or 10x directory ]
    finetune_samples // list: sample ids to fine-tune on (main.nf checks them); empty means every sample

    main:
    def pretraining = params.mode == 'pretrain'
    def finetuning = params.mode == 'finetune' || (pretraining && params.label_key && !params.classifier && !params.reference)

    // One parent MLflow run for the whole pipeline; every step below nests its run under it. Steps get
    // the session id (which -resume keeps), never the store or the parent run id: see MLFLOW_INIT.
    MLFLOW_INIT(workflow.sessionId.toString())
    tracking = MLFLOW_INIT.out.session

    QC(samples, tracking)

    // The vocabulary fixes gene order; a pretrained checkpoint directory carries its own.
    if (params.vocab) {
        vocab = channel.value(file(params.vocab, checkIfExists: true))
    }
    else if (pretraining) {
        VOCAB_BUILD(QC.out.h5ad.map { _meta, h5ad -> h5ad }.collect(), tracking)
        vocab = VOCAB_BUILD.out.vocab
    }
    else {
        // the classifier's vocabulary when embedding with its encoder (--mode embed --classifier)
        def model_dir = params.mode == 'embed' && params.classifier ? params.classifier : params.checkpoint
        vocab = channel.value(file("${model_dir}/vocab.tsv", checkIfExists: true))
    }

    // staged like any input: relative paths work, containers see it, an edit invalidates the cache
    aliases = params.aliases ? channel.value(file(params.aliases, checkIfExists: true)) : channel.value([])
    ALIGN(QC.out.h5ad, vocab, aliases, pretraining, tracking)

    if (pretraining) {
        def init = params.init_checkpoint ? file(params.init_checkpoint, checkIfExists: true) : []
        def deepspeed_config = params.deepspeed_config ? file(params.deepspeed_config, checkIfExists: true) : []
        PRETRAIN(ALIGN.out.shards.map { _meta, dir -> dir }.collect(), vocab, init, deepspeed_config, tracking)
        base_checkpoint = PRETRAIN.out.checkpoint
    }
    else if (params.checkpoint) {
        base_checkpoint = channel.value(file(params.checkpoint, checkIfExists: true))
    }
    else {
        base_checkpoint = channel.value([])
    }

    if (finetuning) {
        // every aligned sample (or those named in --finetune_sample): the split is stratified over all
        // their labelled cells, and samples without labels simply contribute none
        training = ALIGN.out.h5ad
            .filter { meta, _h5ad -> !finetune_samples || finetune_samples.contains(meta.id) }
            .map { _meta, h5ad -> h5ad }
            .collect(sort: true)
        FINETUNE(training, base_checkpoint, vocab, params.label_key, tracking)
        classifier = FINETUNE.out.classifier
        // the classifier carries the fine-tuned encoder its head was trained on
        embed_checkpoint = classifier
    }
    else if (params.classifier) {
        // a classifier directory is a full checkpoint: its encoder is the one its head was trained on
        classifier = channel.value(file(params.classifier, checkIfExists: true))
        embed_checkpoint = classifier
    }
    else {
        classifier = channel.value([])
        embed_checkpoint = base_checkpoint
    }

    EMBED(ALIGN.out.h5ad, embed_checkpoint, vocab, tracking)
    results = EMBED.out.h5ad

    def annotating = finetuning || params.classifier || (params.reference && params.label_key)
    if (annotating) {
        reference = params.reference ? channel.value(file(params.reference, checkIfExists: true)) : channel.value([])
        ANNOTATE(EMBED.out.h5ad, classifier, reference, tracking)
        results = ANNOTATE.out.h5ad
    }

    // gene modules from the model's decoder (the base checkpoint: a classifier may carry no decoder),
    // on the annotated cells so that --gene_modules_groupby can name the predicted cell type
    if (params.gene_modules) {
        def go_db = params.go_db ? file(params.go_db, checkIfExists: true) : []
        GENE_MODULES(results, base_checkpoint, vocab, go_db, tracking)
        gene_dirs = GENE_MODULES.out.dir.map { _meta, dir -> dir }.collect(sort: true)
        if (params.tf_list) {
            GENE_NETWORK(GENE_MODULES.out.dir, file(params.tf_list, checkIfExists: true), tracking)
        }
    }
    else {
        gene_dirs = channel.value([])
    }

    if (params.drug_model) {
        DRUG_RESPONSE(results, channel.value(file(params.drug_model, checkIfExists: true)), tracking)
        results = DRUG_RESPONSE.out.h5ad
    }

    if (params.perturbation_key) {
        def graph = params.perturbation_gene_graph ? file(params.perturbation_gene_graph, checkIfExists: true) : []
        aligned = ALIGN.out.h5ad.map { _meta, h5ad -> h5ad }.collect(sort: true)
        PERTURB(aligned, base_checkpoint, vocab, graph, tracking)
        perturbation = PERTURB.out.predictor
    }
    else {
        perturbation = channel.value([])
    }

    // each result with its sample's QC summary: [ meta, h5ad, qc.json ]
    with_qc = results.join(QC.out.summary)

    per_batch = with_qc
        .map { meta, h5ad, summary -> [meta.batch, h5ad, summary] }
        .groupTuple(sort: true)
        .map { batch, h5ads, summaries -> ["batch_${batch}", h5ads, summaries] }
    REPORT_BATCH(per_batch, [], [], tracking)

    all_samples = with_qc
        .map { _meta, h5ad, summary -> [h5ad, summary] }
        .toList()
        .map { pairs -> ['all_samples', pairs.collect { pair -> pair[0] }.sort(), pairs.collect { pair -> pair[1] }.sort()] }
    REPORT_ALL(all_samples, perturbation, gene_dirs, tracking)

    // the parent run ends once every report is written
    MLFLOW_FINISH(tracking, REPORT_BATCH.out.html.mix(REPORT_ALL.out.html).map { _name, html -> html }.collect())

    versions = channel.empty()
        .mix(MLFLOW_INIT.out.versions, QC.out.versions, ALIGN.out.versions, EMBED.out.versions)
        .mix(REPORT_BATCH.out.versions, REPORT_ALL.out.versions, MLFLOW_FINISH.out.versions)
    if (pretraining && !params.vocab) {
        versions = versions.mix(VOCAB_BUILD.out.versions)
    }
    if (pretraining) {
        versions = versions.mix(PRETRAIN.out.versions)
    }
    if (finetuning) {
        versions = versions.mix(FINETUNE.out.versions)
    }
    if (annotating) {
        versions = versions.mix(ANNOTATE.out.versions)
    }
    if (params.drug_model) {
        versions = versions.mix(DRUG_RESPONSE.out.versions)
    }
    if (params.perturbation_key) {
        versions = versions.mix(PERTURB.out.versions)
    }
    if (params.gene_modules) {
        versions = versions.mix(GENE_MODULES.out.versions)
    }
    if (params.gene_modules && params.tf_list) {
        versions = versions.mix(GENE_NETWORK.out.versions)
    }

    emit:
    h5ad     = results
    reports  = REPORT_BATCH.out.html.mix(REPORT_ALL.out.html)
    perturb  = perturbation
    versions = versions
}
