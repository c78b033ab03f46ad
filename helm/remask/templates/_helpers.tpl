{{/* Names ---------------------------------------------------------------- */}}

{{- define "remask.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The full name; the coordinator Service carries it (clients dial <fullname>:50051).
Trimmed to 45 characters so that "<fullname>-coordinator" and the StatefulSet pods'
"<fullname>-worker-N" (plus their controller-revision-hash label) stay within limits. */}}
{{- define "remask.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "remask.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "remask.fullname" .) -}}
{{- end -}}

{{/* The workers' StatefulSet and their headless Service share this name. */}}
{{- define "remask.worker.fullname" -}}
{{- printf "%s-worker" (include "remask.fullname" .) -}}
{{- end -}}

{{- define "remask.etcd.fullname" -}}
{{- printf "%s-etcd" (include "remask.fullname" .) -}}
{{- end -}}

{{- define "remask.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "remask.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "remask.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: call with (dict "ctx" $ "component" "coordinator") */}}
{{- define "remask.selectorLabels" -}}
app.kubernetes.io/name: {{ include "remask.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "remask.labels" -}}
helm.sh/chart: {{ include "remask.chart" .ctx }}
{{ include "remask.selectorLabels" . }}
app.kubernetes.io/part-of: remask
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{/* Images ---------------------------------------------------------------- */}}

{{- define "remask.image.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "remask.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "remask.image.tag" .) -}}
{{- end -}}

{{/* GPU workers get the CUDA build: <tag><cudaTagSuffix>, unless workers.image.tag is set. */}}
{{- define "remask.worker.image" -}}
{{- $repo := default .Values.image.repository .Values.workers.image.repository -}}
{{- $tag := .Values.workers.image.tag -}}
{{- if not $tag -}}
{{- $tag = include "remask.image.tag" . -}}
{{- if gt (int .Values.workers.gpusPerWorker) 0 -}}
{{- $tag = printf "%s%s" $tag .Values.image.cudaTagSuffix -}}
{{- end -}}
{{- end -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* Cluster ---------------------------------------------------------------- */}}

{{- define "remask.clusterPrefix" -}}
{{- default (printf "/remask/%s/%s" .Release.Namespace .Release.Name) .Values.clusterPrefix -}}
{{- end -}}

{{- define "remask.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "http://%s:2379" (include "remask.etcd.fullname" .) -}}
{{- else -}}
{{- join "," .Values.etcd.endpoints -}}
{{- end -}}
{{- end -}}

{{- define "remask.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "remask.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "remask.authEnabled" -}}
{{- if or .Values.auth.apiKeys .Values.auth.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "remask.workerTlsSecret" -}}
{{- default .Values.tls.existingSecret .Values.tls.workersExistingSecret -}}
{{- end -}}

{{- define "remask.modelClaim" -}}
{{- default (printf "%s-model" (include "remask.fullname" .)) .Values.model.pvc.existingClaim -}}
{{- end -}}

{{/* Flags every remask process takes. */}}
{{- define "remask.commonArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert=/etc/remask/tls/tls.crt
- --tls-key=/etc/remask/tls/tls.key
- --tls-ca=/etc/remask/tls/ca.crt
{{- end }}
- --log-format={{ .Values.logFormat }}
{{- with .Values.otlpEndpoint }}
- --otlp-endpoint={{ . }}
{{- end }}
{{- end -}}

{{/* The model volume; readOnly for the pods that only read it. Call with
(dict "ctx" $ "readOnly" true). */}}
{{- define "remask.modelVolume" -}}
- name: model
{{- if .ctx.Values.model.hostPath }}
  hostPath:
    path: {{ .ctx.Values.model.hostPath }}
    type: {{ .ctx.Values.model.hostPathType }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "remask.modelClaim" .ctx }}
    {{- if .readOnly }}
    readOnly: true
    {{- end }}
{{- end }}
{{- end -}}

{{/* A probe's timing: call with a probe's values. */}}
{{- define "remask.probeTiming" -}}
{{- with .initialDelaySeconds }}
initialDelaySeconds: {{ . }}
{{- end }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end -}}

{{/* Checks that a schema cannot express: fail with a message naming the value. */}}
{{- define "remask.validate" -}}
{{- $v := .Values -}}
{{- if and (not $v.etcd.enabled) (not $v.etcd.endpoints) -}}
{{- fail "etcd.endpoints: list an existing etcd's endpoints when etcd.enabled is false" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) -}}
{{- fail "tls.existingSecret: name a Secret with tls.crt, tls.key and ca.crt when tls.enabled is true" -}}
{{- end -}}
{{- if and (gt (int $v.workers.gpusPerWorker) 0) (gt (int $v.workers.tensorParallel) (int $v.workers.gpusPerWorker)) -}}
{{- fail (printf "workers.tensorParallel (%d) exceeds workers.gpusPerWorker (%d)" (int $v.workers.tensorParallel) (int $v.workers.gpusPerWorker)) -}}
{{- end -}}
{{- if and $v.workers.devices (gt (int $v.workers.gpusPerWorker) 0) (gt (len $v.workers.devices) (int $v.workers.gpusPerWorker)) -}}
{{- fail (printf "workers.devices lists %d devices but workers.gpusPerWorker is %d" (len $v.workers.devices) (int $v.workers.gpusPerWorker)) -}}
{{- end -}}
{{- if and $v.workers.devices (eq (int $v.workers.gpusPerWorker) 0) -}}
{{- fail "workers.devices: CUDA devices need workers.gpusPerWorker > 0" -}}
{{- end -}}
{{- if and $v.workers.devices (gt (int $v.workers.tensorParallel) 1) (ne (int $v.workers.tensorParallel) (len $v.workers.devices)) -}}
{{- fail (printf "workers.tensorParallel (%d) must be 1 or the number of workers.devices (%d): each listed GPU is one rank" (int $v.workers.tensorParallel) (len $v.workers.devices)) -}}
{{- end -}}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.coordinator.http.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled: /metrics is served on the HTTP port: set coordinator.http.enabled" -}}
{{- end -}}
{{- if and (eq $v.coordinator.probes.readiness.handler "http") (not $v.coordinator.http.enabled) -}}
{{- fail "coordinator.probes.readiness.handler=http needs coordinator.http.enabled" -}}
{{- end -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $v.model.mountPath)) $v.model.path) -}}
{{- fail (printf "model.path (%s) must lie under model.mountPath (%s)" $v.model.path $v.model.mountPath) -}}
{{- end -}}
{{- if and (not $v.model.hostPath) (not $v.model.pvc.existingClaim) (not $v.model.pvc.create) -}}
{{- fail "model: set model.hostPath, model.pvc.existingClaim, or model.pvc.create" -}}
{{- end -}}
{{- end -}}

{{/* host:port to listen on; IPv6 hosts get brackets. Call with (dict "ctx" $ "port" N). */}}
{{- define "remask.listen" -}}
{{- $h := .ctx.Values.listenHost -}}
{{- if contains ":" $h -}}
{{- printf "[%s]:%v" $h .port -}}
{{- else -}}
{{- printf "%s:%v" $h .port -}}
{{- end -}}
{{- end -}}
