"""Writing a bundle's metadata into the .tflite flatbuffer, signed (serve/bundle.py reads and checks it).

Two descriptions go in. Ours, serve's BundleMetadata as JSON under BUNDLE_METADATA_NAME, is what serve, the
Android core and the browser page read. The standard one, TFLite Metadata (tflite-support's metadata_schema.fbs,
through the vendored flatc output in quantize/vendored/) under STANDARD_METADATA_NAME with labels.txt zipped onto
the end of the file, is what MediaPipe Tasks, the TFLite Task Library and Android Studio's ML Model Binding read.
The checksum is written last, over all of it.
"""

from __future__ import annotations

import io
import zipfile

import flatbuffers

from quantize.tflite_internals import replace_metadata
from quantize.vendored import metadata_schema_py_generated as schema
from serve.bundle import BUNDLE_METADATA_NAME, CHECKSUM_METADATA_NAME, CHECKSUM_PLACEHOLDER, bundle_digest
from serve.bundle_metadata import BundleMetadata
from serve.tflite_flatbuffer import read_model_metadata

STANDARD_METADATA_NAME = "TFLITE_METADATA"
STANDARD_METADATA_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
# The oldest metadata parser that reads every field written here: image properties, normalisation, stats,
# feature properties and TENSOR_AXIS_LABELS files are all version 1.0.0 of the schema.
MIN_PARSER_VERSION = "1.0.0"
# A fixed time in the zip entry, so that the same model and labels give the same bytes.
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


def embed_metadata(model: bytes, metadata: BundleMetadata) -> bytes:
    """`model` with `metadata` stored as JSON under BUNDLE_METADATA_NAME, the standard TFLite metadata made from
    it under STANDARD_METADATA_NAME, its labels as labels.txt zipped onto the end, and the checksum of all of
    that under CHECKSUM_METADATA_NAME (older copies of each are replaced)."""
    entries = {
        BUNDLE_METADATA_NAME: metadata.to_bytes(),
        STANDARD_METADATA_NAME: standard_metadata(metadata),
        # A placeholder; once the file is laid out, sign_bundle writes the checksum in place.
        CHECKSUM_METADATA_NAME: CHECKSUM_PLACEHOLDER,
    }
    labels = ("\n".join(metadata.labels) + "\n").encode("utf-8")
    return sign_bundle(append_files(replace_metadata(model, entries), {LABELS_FILE: labels}))


def embed_metadata_bytes(model: bytes, document: bytes) -> bytes:
    """`model` with only our two entries: `document` as it is under BUNDLE_METADATA_NAME (tests give malformed
    ones), and its checksum. Standard metadata is dropped, and with the flatbuffer laid out anew, any labels.txt
    zipped onto the end too."""
    entries = {BUNDLE_METADATA_NAME: document, CHECKSUM_METADATA_NAME: CHECKSUM_PLACEHOLDER}
    return sign_bundle(replace_metadata(model, entries, drop=(STANDARD_METADATA_NAME,)))


def sign_bundle(model: bytes) -> bytes:
    """`model`, whose CHECKSUM_METADATA_NAME entry holds 64 placeholder bytes, with its checksum written there."""
    start, length = read_model_metadata(model)[CHECKSUM_METADATA_NAME]
    if length != len(CHECKSUM_PLACEHOLDER):
        raise ValueError(f"the {CHECKSUM_METADATA_NAME} entry holds {length} bytes, not 64")
    return model[:start] + bundle_digest(model, start).encode("ascii") + model[start + length :]


def append_files(model: bytes, files: dict[str, bytes]) -> bytes:
    """`model` followed by a zip archive of `files`, stored uncompressed, its offsets counted from the start of
    the model: the packing of TFLite Metadata's associated files, as tflite-support writes it."""
    out = io.BytesIO()
    out.write(model)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP), data)
    return out.getvalue()


def standard_metadata(metadata: BundleMetadata) -> bytes:
    """The TFLite Metadata flatbuffer that describes a bundle with our `metadata`: an RGB image input of raw
    0..255 pixels (mean 0, std 1: the model normalises inside) and one output of class scores labelled by
    labels.txt."""
    normalization = schema.NormalizationOptionsT()
    normalization.mean, normalization.std = [0.0], [1.0]
    unit = schema.ProcessUnitT()
    unit.optionsType, unit.options = schema.ProcessUnitOptions.NormalizationOptions, normalization
    image_properties = schema.ImagePropertiesT()
    image_properties.colorSpace = schema.ColorSpaceType.RGB
    size = metadata.input
    image = _tensor(
        "image",
        f"One RGB image of {size.width}x{size.height} pixels, raw 0..255 values: normalisation is inside the model.",
        schema.ContentProperties.ImageProperties,
        image_properties,
        low=0.0,
        high=255.0,
    )
    image.processUnits = [unit]
    labels = schema.AssociatedFileT()
    labels.name = LABELS_FILE
    labels.description = "The class names, one per line, in the order of the scores."
    labels.type = schema.AssociatedFileType.TENSOR_AXIS_LABELS
    scores = _tensor(
        "probability",
        f"The probability of each of the {len(metadata.labels)} classes.",
        schema.ContentProperties.FeatureProperties,
        schema.FeaturePropertiesT(),
        low=0.0,
        high=1.0,
    )
    scores.associatedFiles = [labels]
    subgraph = schema.SubGraphMetadataT()
    subgraph.inputTensorMetadata, subgraph.outputTensorMetadata = [image], [scores]
    model = schema.ModelMetadataT()
    model.name = "classifier" if metadata.name is None else metadata.name
    model.description = "Image classifier exported by edge-pipeline: the top classes of one RGB image."
    model.version = metadata.quantization or ""
    model.author = "edge-pipeline"
    model.subgraphMetadata = [subgraph]
    model.minParserVersion = MIN_PARSER_VERSION
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=STANDARD_METADATA_IDENTIFIER)
    return bytes(builder.Output())


def _tensor(name: str, description: str, kind: int, properties, *, low: float, high: float):
    tensor = schema.TensorMetadataT()
    tensor.name, tensor.description = name, description
    tensor.content = schema.ContentT()
    tensor.content.contentPropertiesType, tensor.content.contentProperties = kind, properties
    tensor.stats = schema.StatsT()
    tensor.stats.min, tensor.stats.max = [low], [high]
    return tensor
