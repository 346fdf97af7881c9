"""Built-in catalogue of medical image classification datasets used by medical PEFT papers.

An entry says what the dataset is, of which task kind, under which licence and where to get it;
``entry.to_spec(source)`` turns it into a TaskSpec once the files are on some storage. Entries of the
``table`` format read the official download as it unpacks (their label tables and image folders), given
the download folder as ``source``. Licence notes are pointers, not legal advice: MedMNIST v2 is
released under CC BY 4.0, but each source dataset keeps its own licence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from shpeft_core.options import DEFAULT_METRIC

from .spec import TaskSpec

__all__ = ["CatalogueEntry", "CATALOGUE", "MEDMNIST_2D", "default_data_root"]


def default_data_root() -> str:
    """Where catalogue datasets are looked for by default: $SHPEFT_DATA or ~/.cache/shpeft/data."""
    return os.environ.get("SHPEFT_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "shpeft", "data")


@dataclass(frozen=True)
class CatalogueEntry:
    key: str
    title: str
    modality: str
    class_names: tuple[str, ...]
    channels: int
    licence: str
    obtain: str
    format: str = "imagefolder"
    size_note: str = ""
    notes: str = ""
    medmnist: bool = False
    multilabel: bool = False
    metric: str = DEFAULT_METRIC
    kind: str = "single_label"
    table: dict | None = None  # TableLayout fields for the official layout (format "table")
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_spec(self, source: str | None = None, *, name: str | None = None, image_size: int | None = None, **overrides) -> TaskSpec:
        """A TaskSpec for this dataset at ``source`` (MedMNIST: a folder or .npz; default data root; label
        tables: the download folder).

        ``overrides`` win over the entry's fields; a ``table`` override is merged into the entry's layout
        (e.g. ``table={"files": "Data_Entry_2017.csv"}``). ChestMNIST is multi-label; with
        ``multilabel="any"`` it becomes a binary 'no finding' / 'any finding' task.
        """
        if source is None:
            if not self.medmnist:
                raise ValueError(
                    f"catalogue entry '{self.key}' needs a source: get it from {self.obtain} and pass its location"
                )
            source = os.path.join(default_data_root(), "medmnist")
        fields = dict(
            name=name or self.key,
            source=source,
            format=self.format,
            num_classes=self.num_classes,
            class_names=list(self.class_names),
            modality=self.modality,
            channels=self.channels,
            image_size=image_size,
            metric=self.metric,
            kind=self.kind,
            description=self.title,
        )
        if self.table is not None:
            fields["table"] = {**self.table, **(overrides.pop("table", None) or {})}
        if self.medmnist:
            fields.update(medmnist_name=self.key, image_size=image_size or 28)
            if self.multilabel and overrides.get("multilabel") == "any":
                fields.update(kind="single_label", num_classes=2, class_names=["no finding", "any finding"],
                              metric="macro_f1")
        fields.update(overrides)
        return TaskSpec(**fields)


_CHEXPERT = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
             "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
             "Fracture", "Support Devices")
_MEDMNIST_LICENCE = "MedMNIST v2: CC BY 4.0; source data: {src}"
_MEDMNIST_OBTAIN = "https://zenodo.org/records/10519652 ({key}.npz; {key}_64/_128/_224.npz for MedMNIST+); fetched automatically when a network exists"
_ORGAN = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
)


def _mm(key, title, modality, classes, channels, src_licence, size_note, notes="", multilabel=False,
        kind="single_label", metric="macro_f1"):
    return CatalogueEntry(
        key=key,
        title=title,
        modality=modality,
        class_names=tuple(classes),
        channels=channels,
        licence=_MEDMNIST_LICENCE.format(src=src_licence),
        obtain=_MEDMNIST_OBTAIN.format(key=key),
        format="medmnist",
        size_note=size_note,
        notes=notes,
        medmnist=True,
        multilabel=multilabel,
        kind=kind,
        metric=metric,
    )


MEDMNIST_2D = (
    _mm("pathmnist", "PathMNIST: colon pathology (NCT-CRC-HE-100K / CRC-VAL-HE-7K)", "pathology",
        ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium"], 3,
        "NCT-CRC-HE-100K, CC BY 4.0", "107,180 images (89,996 / 10,004 / 7,180)"),
    _mm("chestmnist", "ChestMNIST: chest X-ray (NIH ChestX-ray14)", "xray",
        ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
         "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"], 1,
        "NIH ChestX-ray14, CC0 1.0", "112,120 images (78,468 / 11,219 / 22,433)",
        "multi-label: one sigmoid output per finding, mean AUROC; overrides {multilabel: any} binarise it to "
        "'no finding' vs 'any finding'", multilabel=True, kind="multi_label", metric="auc"),
    _mm("dermamnist", "DermaMNIST: dermatoscopy (HAM10000)", "dermoscopy",
        ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
         "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"], 3,
        "HAM10000, CC BY-NC 4.0 (non-commercial)", "10,015 images (7,007 / 1,003 / 2,005)"),
    _mm("octmnist", "OCTMNIST: retinal OCT (Kermany et al. 2018)", "oct",
        ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"], 1,
        "Kermany et al., CC BY 4.0", "109,309 images (97,477 / 10,832 / 1,000)"),
    _mm("pneumoniamnist", "PneumoniaMNIST: paediatric chest X-ray (Kermany et al. 2018)", "xray",
        ["normal", "pneumonia"], 1, "Kermany et al., CC BY 4.0", "5,856 images (4,708 / 524 / 624)"),
    _mm("retinamnist", "RetinaMNIST: fundus, diabetic retinopathy grade (DeepDRiD)", "fundus",
        ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"], 3,
        "DeepDRiD, CC BY 4.0", "1,600 images (1,080 / 120 / 400)",
        "ordinal grades: quadratic weighted kappa is the metric", kind="ordinal", metric="kappa"),
    _mm("breastmnist", "BreastMNIST: breast ultrasound (BUSI)", "ultrasound",
        ["malignant", "normal, benign"], 1, "BUSI (Al-Dhabyani et al. 2020), CC0 1.0 as released",
        "780 images (546 / 78 / 156)", "BUSI's normal and benign classes are merged"),
    _mm("bloodmnist", "BloodMNIST: blood cell microscopy (Acevedo et al. 2020)", "microscopy",
        ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
         "neutrophil", "platelet"], 3, "Acevedo et al., CC BY 4.0", "17,092 images (11,959 / 1,712 / 3,421)"),
    _mm("tissuemnist", "TissueMNIST: kidney cortex microscopy (BBBC051)", "microscopy",
        ["collecting duct, connecting tubule", "distal convoluted tubule", "glomerular endothelial cells",
         "interstitial endothelial cells", "leukocytes", "podocytes", "proximal tubule segments",
         "thick ascending limb"], 1, "BBBC051, CC BY 3.0", "236,386 images (165,466 / 23,640 / 47,280)"),
    _mm("organamnist", "OrganAMNIST: abdominal CT, axial (LiTS)", "ct", _ORGAN, 1,
        "LiTS, CC BY-NC-SA 4.0 (non-commercial)", "58,830 images (34,561 / 6,491 / 17,778)"),
    _mm("organcmnist", "OrganCMNIST: abdominal CT, coronal (LiTS)", "ct", _ORGAN, 1,
        "LiTS, CC BY-NC-SA 4.0 (non-commercial)", "23,583 images (12,975 / 2,392 / 8,216)"),
    _mm("organsmnist", "OrganSMNIST: abdominal CT, sagittal (LiTS)", "ct", _ORGAN, 1,
        "LiTS, CC BY-NC-SA 4.0 (non-commercial)", "25,211 images (13,932 / 2,452 / 8,827)"),
)

_OTHERS = (
    CatalogueEntry(
        key="covid19-ct",
        title="COVID-CT: chest CT slices, COVID-19 vs not (Yang et al. 2020)",
        modality="ct",
        class_names=("covid", "non-covid"),
        channels=1,
        licence="images collected from published preprints; the repository allows research use (check it)",
        obtain="https://github.com/UCSD-AI4H/COVID-CT (Images-processed/CT_COVID, CT_NonCOVID; data split lists in Data-split/)",
        size_note="349 COVID / 463 non-COVID slices (the figures SH-PEFT quotes)",
        notes="arrange as <root>/<split>/<class>/*.png from the official split lists; macro-F1 is the SH-PEFT metric",
    ),
    CatalogueEntry(
        key="busi",
        title="BUSI: breast ultrasound images (Al-Dhabyani et al. 2020)",
        modality="ultrasound",
        class_names=("normal", "benign", "malignant"),
        channels=1,
        licence="CC0 1.0 as released on the authors' site and Kaggle (check the release you use)",
        obtain="https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (also Kaggle 'breast-ultrasound-images-dataset')",
        size_note="780 images (133 normal / 437 benign / 210 malignant), ~500x500 px",
        notes="drop the *_mask*.png segmentation files before use; no official split: the seeded split applies",
    ),
    CatalogueEntry(
        key="chaoyang",
        title="Chaoyang: colon pathology patches with noisy labels (Zhu et al. 2021)",
        modality="pathology",
        class_names=("normal", "serrated", "adenocarcinoma", "adenoma"),
        channels=3,
        licence="research use; obtained from the authors (see the repository)",
        obtain="https://github.com/bupt-ai-cz/HSA-NRL (Chaoyang dataset link), 512x512 patches with train/test json",
        size_note="6,160 patches (4,021 train / 2,139 test)",
        notes="test labels are the consensus of three pathologists; carve val out of train (seeded)",
    ),
    CatalogueEntry(
        key="brain-tumor-mri",
        title="Brain tumour MRI (Nickparvar 2021; figshare + SARTAJ + Br35H)",
        modality="mri",
        class_names=("glioma", "meningioma", "notumor", "pituitary"),
        channels=1,
        licence="CC0 1.0 on Kaggle; the constituent sets carry their own terms",
        obtain="https://www.kaggle.com/datasets/masoudnickparvar/brain-tumor-mri-dataset (Training/ and Testing/ class folders)",
        size_note="7,023 images (5,712 train / 1,311 test)",
        notes="rename Training/Testing to train/test for the split layout, or use one folder and the seeded split",
    ),
    CatalogueEntry(
        key="isic2019",
        title="ISIC 2019: dermoscopy, 8 diagnostic classes",
        modality="dermoscopy",
        class_names=("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"),
        channels=3,
        licence="CC BY-NC 4.0 (non-commercial; attribution to ISIC and the contributing archives)",
        obtain="https://challenge.isic-archive.com/data/#2019 (ISIC_2019_Training_Input + ISIC_2019_Training_GroundTruth.csv)",
        format="table",
        size_note="25,331 training images; the test set's labels are not public",
        notes="source: the folder holding ISIC_2019_Training_GroundTruth.csv and ISIC_2019_Training_Input/; "
              "one-hot columns (UNK, always 0, is left out); no official split: a seeded stratified split",
        table={"files": "ISIC_2019_Training_GroundTruth.csv", "images": "ISIC_2019_Training_Input",
               "path_column": "image", "path_template": "{}.jpg",
               "label_columns": ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]},
    ),
    CatalogueEntry(
        key="isic2018",
        title="ISIC 2018 task 3 (HAM10000): dermoscopy, 7 classes",
        modality="dermoscopy",
        class_names=("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"),
        channels=3,
        licence="CC BY-NC 4.0 (non-commercial)",
        obtain="https://challenge.isic-archive.com/data/#2018 (Task 3 training, validation and test inputs + ground truth)",
        format="table",
        size_note="10,015 train / 193 val / 1,512 test images",
        notes="source: the folder holding the six ISIC2018_Task3_{Training,Validation,Test}_{Input,GroundTruth} "
              "folders as unzipped; the official splits; one-hot ground-truth columns",
        table={"files": {s: f"ISIC2018_Task3_{n}_GroundTruth/ISIC2018_Task3_{n}_GroundTruth.csv"
                         for s, n in (("train", "Training"), ("val", "Validation"), ("test", "Test"))},
               "path_column": "image", "path_template": "{}.jpg", "find_by_name": True,
               "label_columns": ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]},
    ),
    CatalogueEntry(
        key="chestxray14",
        title="NIH ChestX-ray14: chest X-ray, 14 findings (Wang et al. 2017)",
        modality="xray",
        class_names=("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                     "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                     "Hernia"),
        channels=1,
        licence="CC0 1.0 as released by the NIH Clinical Center (cite Wang et al. 2017)",
        obtain="https://nihcc.app.box.com/v/ChestXray-NIHCC (images_001..012.tar.gz, Data_Entry_2017_v2020.csv, "
               "train_val_list.txt, test_list.txt; also on Kaggle as 'nih-chest-xrays/data')",
        format="table",
        size_note="112,120 frontal X-rays of 30,805 patients (86,524 train+val / 25,596 test, split by patient)",
        notes="source: the download folder; images are found by file name under it (images/ from the tarballs, or "
              "Kaggle's images_0NN/images/); the official test list; validation drawn from train by patient. "
              "An older copy names its table Data_Entry_2017.csv: overrides {table: {files: Data_Entry_2017.csv}}",
        kind="multi_label",
        metric="auc",
        table={"files": "Data_Entry_2017_v2020.csv", "path_column": "Image Index", "find_by_name": True,
               "label_column": "Finding Labels", "separator": "|", "none_value": "No Finding",
               "group_column": "Patient ID", "split_lists": {"train": "train_val_list.txt", "test": "test_list.txt"}},
    ),
    CatalogueEntry(
        key="chexpert",
        title="CheXpert: chest X-ray, 14 observations with uncertain labels (Irvin et al. 2019)",
        modality="xray",
        class_names=_CHEXPERT,
        channels=1,
        licence="Stanford CheXpert Dataset Research Use Agreement (non-commercial research; register to download)",
        obtain="https://stanfordmlgroup.github.io/competitions/chexpert/ (CheXpert-v1.0-small.zip; the full-size "
               "CheXpert-v1.0 on Stanford AIMI)",
        format="table",
        size_note="224,316 radiographs of 65,240 patients (223,414 train / 234 valid)",
        notes="source: the folder the zip was unpacked into (holding CheXpert-v1.0-small/); the official valid.csv "
              "is the test split and validation is drawn from train by patient; -1 (uncertain) is ignored, blank "
              "is negative (table.uncertain / uncertain_per_finding: positive or negative). Full size: overrides "
              "{table: {files: {train: CheXpert-v1.0/train.csv, test: CheXpert-v1.0/valid.csv}}}",
        kind="multi_label",
        metric="auc",
        table={"files": {"train": "CheXpert-v1.0-small/train.csv", "test": "CheXpert-v1.0-small/valid.csv"},
               "path_column": "Path", "label_columns": list(_CHEXPERT), "group_pattern": r"(patient\d+)",
               "uncertain": "ignore", "blank": "negative"},
    ),
    CatalogueEntry(
        key="aptos2019",
        title="APTOS 2019 blindness detection: fundus, diabetic retinopathy grade",
        modality="fundus",
        class_names=("no DR", "mild", "moderate", "severe", "proliferative DR"),
        channels=3,
        licence="Kaggle competition rules (non-commercial research; accept them on Kaggle)",
        obtain="https://www.kaggle.com/competitions/aptos2019-blindness-detection (train_images + train.csv)",
        format="table",
        size_note="3,662 labelled images",
        notes="source: the competition folder (train.csv, train_images/); ordinal grades, quadratic weighted kappa "
              "(the competition metric); no patient ids: a seeded split stratified by grade",
        kind="ordinal",
        metric="kappa",
        table={"files": "train.csv", "path_column": "id_code", "path_template": "train_images/{}.png",
               "label_column": "diagnosis"},
    ),
    CatalogueEntry(
        key="eyepacs",
        title="EyePACS (Kaggle diabetic retinopathy detection 2015): fundus, DR grade",
        modality="fundus",
        class_names=("no DR", "mild", "moderate", "severe", "proliferative DR"),
        channels=3,
        licence="Kaggle competition rules (non-commercial research)",
        obtain="https://www.kaggle.com/competitions/diabetic-retinopathy-detection (train + trainLabels.csv; test labels released after)",
        format="table",
        size_note="35,126 train / 53,576 test images, large (up to ~5,000 px): resize once to the working size",
        notes="source: the competition folder (trainLabels.csv, train/); a patient's two eyes (10_left, 10_right) "
              "stay in one split; quadratic weighted kappa",
        kind="ordinal",
        metric="kappa",
        table={"files": "trainLabels.csv", "path_column": "image", "path_template": "train/{}.jpeg",
               "label_column": "level", "group_pattern": r"^(\d+)_"},
    ),
)

CATALOGUE: dict[str, CatalogueEntry] = {e.key: e for e in MEDMNIST_2D + _OTHERS}
