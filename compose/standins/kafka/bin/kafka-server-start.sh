#!/bin/sh
exec /opt/kafka/bin/run kafka.Kafka "$@"
