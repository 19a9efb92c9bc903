#!/bin/sh
# Start SeaweedFS for the farm: master, volume server, filer and S3 gateway in one process, data
# in /data (a named volume). Mounted into the chrislusf/seaweedfs image by docker/compose.yaml.
#
# The S3 gateway gets one identity whose keys come from the environment (docker/.env, passed in
# by compose), written to a file only this container can read: the keys are never in a file of
# the repository. Keys must not contain `"` or `\`.
set -eu
: "${S3_ACCESS_KEY_ID:?set FARM_STORAGE__S3__ACCESS_KEY_ID in docker/.env}"
: "${S3_SECRET_ACCESS_KEY:?set FARM_STORAGE__S3__SECRET_ACCESS_KEY in docker/.env}"
case "$S3_ACCESS_KEY_ID$S3_SECRET_ACCESS_KEY" in
*'"'* | *'\'*)
    echo "seaweedfs: S3 keys must not contain \" or \\" >&2
    exit 1
    ;;
esac

config=/tmp/farm-s3.json
umask 077
printf '{"identities": [{"name": "farm", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
    "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY" >"$config"

# -master.telemetry=false: never report usage to the SeaweedFS project.
exec weed -logtostderr=true server \
    -dir=/data \
    -master.telemetry=false \
    -master.volumeSizeLimitMB="${SEAWEEDFS_VOLUME_SIZE_MB:-1024}" \
    -volume.max=0 \
    -s3 \
    -s3.port=8333 \
    -s3.config="$config"
