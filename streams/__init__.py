"""cloudlet's vocabulary: service objects, sensor updates, codecs, topics and the registry.

This package is the ground floor: it imports nothing else of cloudlet's.
"""

from streams.codec import Codec, decode, detect, encode_batch, encode_update, update_document
from streams.objects import Action, Channel, ChannelType, Group, ServiceObject, Stream
from streams.registry import Problem, Registry, RegistryError
from streams.rejections import InvalidUpdate, Rejection, RejectReason, dead_letter_record
from streams.topics import TopicScheme
from streams.updates import GeoPoint, SensorUpdate, StreamKey, StreamValidator, Value

__all__ = [
    "Action",
    "Channel",
    "ChannelType",
    "Codec",
    "GeoPoint",
    "Group",
    "InvalidUpdate",
    "Problem",
    "Registry",
    "RegistryError",
    "RejectReason",
    "Rejection",
    "SensorUpdate",
    "ServiceObject",
    "Stream",
    "StreamKey",
    "StreamValidator",
    "TopicScheme",
    "Value",
    "dead_letter_record",
    "decode",
    "detect",
    "encode_batch",
    "encode_update",
    "update_document",
]
