"""The HDF5 feature store: one file, one group per backbone key, read lazily.

Layout of a group ``/<key>`` (all row datasets aligned, in source order)::

    features  [n, D]  float16/float32, chunked, resizable along rows
    labels    [n]     int64 class index (-1: unlabeled)
    ids       [n]     utf-8 image identifier (relative path or dataset index)
    split     [n]     int8 code into attrs['split_names']
    index     [n]     int64 position of the image in the source's image list
    skipped/{ids,index,reasons}  images that could not be decoded, with the reason

and attributes recording what produced it (model, weights hash, data config, versions,
image-list hash ...; see :class:`StoreKey`). Extraction writes into a journal file beside the
store (:class:`JournalWriter`) and commits the finished group into the store by an atomic
rename, so an interrupted run never damages groups already there. This package is the only
part of featx that opens HDF5 files.
"""

from ._commit import check_store_path, commit_group, group_attrs
from ._journal import JournalWriter, journal_path
from ._reader import FeatureSet, FeatureStore, StoreKey, load_features, open_store

__all__ = ["StoreKey", "FeatureSet", "FeatureStore", "open_store", "load_features", "JournalWriter", "journal_path",
           "commit_group", "check_store_path", "group_attrs"]
