#!/bin/sh
# the official image's topics tool (the demos' health checks call it)
KAFKA_HEAP_OPTS="-Xmx128m" exec /opt/kafka/bin/run org.apache.kafka.tools.TopicCommand "$@"
