{{/* Names and labels. */}}
{{- define "lmserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lmserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lmserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "lmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The label selector the router discovers engines with (also the engines' PDB/monitor selector). */}}
{{- define "lmserve.engineSelector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,app.kubernetes.io/component=engine" (include "lmserve.name" .) .Release.Name -}}
{{- end -}}

{{- define "lmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lmserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lmserve.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "lmserve.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{- define "lmserve.redisName" -}}
{{- printf "%s-redis" (include "lmserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* image: (dict "image" $override "root" $) */}}
{{- define "lmserve.image" -}}
{{- $g := .root.Values.image -}}
{{- $o := .image | default dict -}}
{{- $repo := $o.repository | default $g.repository -}}
{{- $tag := $o.tag | default $g.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "lmserve.pullPolicy" -}}
{{- $o := .image | default dict -}}
{{- $o.pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end -}}

{{/*
Deep merge, src's keys win (unlike mergeOverwrite, false / 0 / "" also win):
(dict "dst" $dst "src" $src); mutates dst.
*/}}
{{- define "lmserve.merge" -}}
{{- $dst := .dst -}}
{{- range $k, $v := .src -}}
{{- if and (kindIs "map" $v) (kindIs "map" (index $dst $k)) -}}
{{- include "lmserve.merge" (dict "dst" (index $dst $k) "src" $v) -}}
{{- else -}}
{{- $_ := set $dst $k $v -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The checks the schema cannot express. Called from every template that depends on them, so a
`helm template -s` of one file still fails.
*/}}
{{- define "lmserve.validate" -}}
{{- $v := .Values -}}
{{- if and $v.autoscaling.keda.enabled $v.autoscaling.hpa.enabled -}}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled are mutually exclusive: turn one off" -}}
{{- end -}}
{{- if and $v.monitoring.serviceMonitor.enabled $v.monitoring.podMonitor.enabled -}}
{{- fail "monitoring.serviceMonitor.enabled and monitoring.podMonitor.enabled are mutually exclusive (each would scrape the engines)" -}}
{{- end -}}
{{- if and $v.kvStorage.redis.enabled $v.kvStorage.redis.externalUrl -}}
{{- fail "kvStorage.redis.enabled and kvStorage.redis.externalUrl are mutually exclusive: the chart's Redis or yours" -}}
{{- end -}}
{{- if and $v.apiKey.enabled (not $v.apiKey.existingSecret) (not $v.apiKey.value) -}}
{{- fail "apiKey.enabled needs apiKey.existingSecret or apiKey.value" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $m := $v.models -}}
{{- if hasKey $seen $m.name -}}
{{- fail (printf "models[%d].name: %q is used twice" $i $m.name) -}}
{{- end -}}
{{- $_ := set $seen $m.name true -}}
{{- if and (hasKey $m "port") (ne (int $m.port) (int $v.engineDefaults.port)) -}}
{{- fail (printf "models[%d].port: every engine listens on engineDefaults.port (the router's --k8s-port); set that instead" $i) -}}
{{- end -}}
{{- if not $m.source -}}
{{- fail (printf "models[%d].source: missing (one of hub, pvc, hostPath, builtin)" $i) -}}
{{- end -}}
{{- end -}}
{{- if and $v.router.enabled (eq $v.router.routingLogic "kv-aware") -}}
{{- $k := $v.router.kvAware -}}
{{- if and (not $k.tokenizer) (not $k.tokenizerFromModel) -}}
{{- fail "router.routingLogic kv-aware needs router.kvAware.tokenizer or router.kvAware.tokenizerFromModel" -}}
{{- end -}}
{{- if $k.tokenizerFromModel -}}
{{- if not (hasKey $seen $k.tokenizerFromModel) -}}
{{- fail (printf "router.kvAware.tokenizerFromModel: no model named %q in models" $k.tokenizerFromModel) -}}
{{- end -}}
{{- range $v.models -}}
{{- if and (eq .name $k.tokenizerFromModel) .source.builtin -}}
{{- fail "router.kvAware.tokenizerFromModel: a builtin model has no tokenizer folder; set router.kvAware.tokenizer" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A model entry merged over engineDefaults, as JSON: (dict "model" $m "root" $) */}}
{{- define "lmserve.model" -}}
{{- $m := deepCopy .root.Values.engineDefaults -}}
{{- include "lmserve.merge" (dict "dst" $m "src" (deepCopy .model)) -}}
{{- $served := .model.servedModelName -}}
{{- if not $served -}}
{{- if .model.source.hub -}}{{- $served = .model.source.hub.id -}}
{{- else if .model.source.builtin -}}{{- $served = "SmolLM2-135M-Instruct" -}}
{{- else -}}{{- $served = .model.name -}}
{{- end -}}
{{- end -}}
{{- $_ := set $m "servedModelName" $served -}}
{{- $_ := set $m "fullname" (printf "%s-%s" (include "lmserve.fullname" .root) .model.name | trunc 63 | trimSuffix "-") -}}
{{- toJson $m -}}
{{- end -}}

{{/* Where the engine finds the model: the MODEL argument of `lmserve serve` ("" = builtin). */}}
{{- define "lmserve.modelPath" -}}
{{- $s := .source -}}
{{- if $s.hub -}}{{ $s.hub.id }}
{{- else if $s.pvc -}}{{ trimSuffix "/" (printf "/models/%s" ($s.pvc.path | default "" | trimPrefix "/")) }}
{{- else if $s.hostPath -}}/models
{{- end -}}
{{- end -}}

{{- define "lmserve.kvTransferConfig" -}}
{{- $k := .Values.kvStorage -}}
{{- $extra := dict "chunk_size" (int $k.chunkSize) "cpu_size_gib" $k.cpuSizeGib "remote_timeout_s" $k.remoteTimeoutS -}}
{{- if $k.disk.enabled -}}
{{- $_ := set $extra "disk_path" $k.disk.path -}}
{{- $_ := set $extra "disk_size_gib" $k.disk.sizeGib -}}
{{- end -}}
{{- if $k.redis.enabled -}}
{{- $_ := set $extra "remote_url" (printf "redis://%s:6379/0" (include "lmserve.redisName" .)) -}}
{{- else if $k.redis.externalUrl -}}
{{- $_ := set $extra "remote_url" $k.redis.externalUrl -}}
{{- end -}}
{{- if $k.modelId -}}
{{- $_ := set $extra "model_id" $k.modelId -}}
{{- end -}}
{{- toJson (dict "kv_connector" "TieredConnector" "kv_role" $k.role "kv_connector_extra_config" $extra) -}}
{{- end -}}

{{- define "lmserve.kvEventsConfig" -}}
{{- $k := .Values.router.kvAware -}}
{{- $c := dict "enable_kv_cache_events" true "publisher" "zmq" "endpoint" (printf "tcp://*:%d" (int $k.eventsPort)) "replay_endpoint" (printf "tcp://*:%d" (int $k.replayPort)) -}}
{{- if $k.topic -}}
{{- $_ := set $c "topic" $k.topic -}}
{{- end -}}
{{- toJson $c -}}
{{- end -}}

{{- define "lmserve.kvAware" -}}
{{- if and .Values.router.enabled (eq .Values.router.routingLogic "kv-aware") -}}true{{- end -}}
{{- end -}}

{{/*
Flags from a map (engineArgs / routerArgs), sorted: true -> --flag, false -> --no-flag
(or nothing for store_true flags), maps -> JSON, lists -> repeated values.
(dict "args" $map "storeTrue" (list "disable-access-log"))
*/}}
{{- define "lmserve.flags" -}}
{{- $out := list -}}
{{- $storeTrue := .storeTrue | default list -}}
{{- range $k := keys .args | sortAlpha -}}
{{- $v := index $.args $k -}}
{{- if kindIs "bool" $v -}}
{{- if $v -}}
{{- $out = append $out (printf "--%s" $k) -}}
{{- else if not (has $k $storeTrue) -}}
{{- $out = append $out (printf "--no-%s" $k) -}}
{{- end -}}
{{- else if kindIs "map" $v -}}
{{- $out = concat $out (list (printf "--%s" $k) (toJson $v)) -}}
{{- else if kindIs "slice" $v -}}
{{- $out = append $out (printf "--%s" $k) -}}
{{- range $v -}}{{- $out = append $out (toString .) -}}{{- end -}}
{{- else if kindIs "float64" $v -}}
{{- $out = concat $out (list (printf "--%s" $k) (include "lmserve.number" $v)) -}}
{{- else -}}
{{- $out = concat $out (list (printf "--%s" $k) (toString $v)) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* A number without exponent notation (1e+06 -> 1000000), integers without ".0". */}}
{{- define "lmserve.number" -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- end -}}
