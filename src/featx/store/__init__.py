"""The HDF5 feature store: one group per backbone key, read lazily; a commit costs what it adds.

Layout of a group ``/<key>`` (all row datasets aligned, in source order)::

    features  [n, D]  float16/float32 (a virtual dataset over its parts when assembled from several)
    labels    [n]     int64 class index (-1: unlabeled)
    ids       [n]     utf-8 image identifier (relative path, dataset index or shard/key)
    split     [n]     int8 code into attrs['split_names']
    index     [n]     int64 position of the image in the source's image list
    digest    [n]     hex BLAKE2b-128 of the bytes the image was decoded from (same image, same digest)
    stamp     [n, 2]  int64 size and mtime (ns) of the image's file (its shard's, for tar members)
    skipped/{ids,index,reasons,stamp}  images that could not be decoded, with the reason

and attributes recording what produced it (model, weights hash, data config, versions,
image-list hash, file-stamp hash ...; see :class:`StoreKey`). ``FEATURES.h5`` is a small index
of HDF5 external links into one file per group in ``FEATURES.h5.d/`` (see :mod:`._layout`);
stores written by featx 0.1 (all groups in one file) read as they are and are extended without
a copy. Extraction writes into a journal file beside the store (:class:`JournalWriter`, one per
rank under torchrun) and commits finished journals by an atomic rename of the index, so an
interrupted run never damages groups already there. This package is the only part of featx that
opens HDF5 files.
"""

from ._commit import ImageList, check_store_path, commit_group, commit_parts, group_attrs, group_feature_dim
from ._journal import JournalWriter, forget_committed_journals, journal_path
from ._layout import data_dir
from ._reader import FeatureSet, FeatureStore, StoreKey, is_hdf5_file, load_features, open_store

__all__ = ["StoreKey", "FeatureSet", "FeatureStore", "open_store", "load_features", "JournalWriter", "journal_path", "forget_committed_journals",
           "commit_group", "commit_parts", "check_store_path", "group_attrs", "group_feature_dim", "ImageList", "data_dir", "is_hdf5_file"]
