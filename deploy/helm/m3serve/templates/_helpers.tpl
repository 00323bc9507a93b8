{{/* Names -------------------------------------------------------------------------------------------- */}}

{{- define "m3serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; component names append "-gateway" / "-worker", so keep room for them. */}}
{{- define "m3serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "m3serve.gateway.fullname" -}}{{ include "m3serve.fullname" . }}-gateway{{- end }}
{{- define "m3serve.worker.fullname" -}}{{ include "m3serve.fullname" . }}-worker{{- end }}

{{- define "m3serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "m3serve.gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------------------- */}}

{{/* Every object's labels: the component's selector labels plus release metadata. (dict "ctx" $ "component" "...") */}}
{{- define "m3serve.labels" -}}
{{ include "m3serve.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: m3serve
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component ("gateway" or "worker"). Pass (dict "ctx" $ "component" "...").  */}}
{{- define "m3serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "m3serve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of the worker pods that serve HTTP (a single-node worker, or the leader of a LeaderWorkerSet
group). The gateway discovers exactly these pods; the worker Service selects them too.
*/}}
{{- define "m3serve.worker.servingSelectorLabels" -}}
{{ include "m3serve.selectorLabels" (dict "ctx" . "component" "worker") }}
m3serve.io/serves-http: "true"
{{- end }}

{{/* The same labels as a Kubernetes label-selector string, for the gateway's --discovery-selector. */}}
{{- define "m3serve.worker.discoverySelector" -}}
{{- $labels := include "m3serve.worker.servingSelectorLabels" . | fromYaml }}
{{- $pairs := list }}
{{- range $k := keys $labels | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (get $labels $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* Image ------------------------------------------------------------------------------------------- */}}

{{- define "m3serve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Model ------------------------------------------------------------------------------------------- */}}

{{/* Folder of the checkpoint inside every pod: what --model-path gets. */}}
{{- define "m3serve.modelPath" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
{{- if $m.pvc.subPath }}{{ printf "%s/%s" $m.mountPath (trimPrefix "/" $m.pvc.subPath) }}{{ else }}{{ $m.mountPath }}{{ end }}
{{- else if eq $m.source "tiny" }}
{{- printf "%s/tiny" $m.mountPath }}
{{- else }}
{{- printf "%s/%s" $m.mountPath (default $m.name $m.download.repo | replace "/" "--") }}
{{- end }}
{{- end }}

{{- define "m3serve.modelPvcName" -}}{{ include "m3serve.fullname" . }}-model{{- end }}

{{/*
The model volume of a worker pod. download+pvc: the shared claim this chart creates; download+emptyDir
or tiny: a scratch volume the init container fills; pvc: the user's claim, read-only.
*/}}
{{- define "m3serve.worker.modelVolume" -}}
- name: model
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if and (eq $m.source "download") (eq $m.download.storage "pvc") }}
  persistentVolumeClaim:
    claimName: {{ include "m3serve.modelPvcName" . }}
{{- else if eq $m.source "download" }}
  emptyDir:
    sizeLimit: {{ $m.download.emptyDir.sizeLimit }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/*
The init container that puts the checkpoint at m3serve.modelPath, or nothing when a PVC already holds
it. Pass (dict "ctx" $ "include" LIST): include limits the download to matching files (the gateway only
needs the tokenizer and the template).
*/}}
{{- define "m3serve.modelInitContainer" -}}
{{- $ := .ctx }}
{{- $m := $.Values.model }}
{{- if ne $m.source "pvc" -}}
- name: fetch-model
  image: {{ include "m3serve.image" $ }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  {{- if eq $m.source "tiny" }}
  command: ["m3serve", "tiny-model", "--out", {{ include "m3serve.modelPath" $ | quote }}]
  {{- else }}
  command:
    - hf
    - download
    - {{ default $m.name $m.download.repo | quote }}
    - --revision
    - {{ $m.download.revision | quote }}
    - --local-dir
    - {{ include "m3serve.modelPath" $ | quote }}
    {{- range .include }}
    - --include
    - {{ . | quote }}
    {{- end }}
  {{- end }}
  env:
    # Caches go to the /tmp scratch volume (the gateway runs with a read-only root filesystem).
    - name: HOME
      value: /tmp
    - name: HF_HOME
      value: /tmp/hf-home
    {{- if and (eq $m.source "download") $m.download.hfTokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $m.download.hfTokenSecret.name }}
          key: {{ $m.download.hfTokenSecret.key }}
    {{- end }}
  resources:
    {{- toYaml $m.download.resources | nindent 4 }}
  volumeMounts:
    - {name: model, mountPath: {{ $m.mountPath }}}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end }}

{{/* Cross-field checks the JSON schema cannot express; each fails with the value to change. -------- */}}
{{- define "m3serve.validate" -}}
{{- $w := .Values.workers }}
{{- if ne (mod (int $w.tp) (int $w.nodes)) 0 }}
{{- fail (printf "workers.tp (%d) must be a multiple of workers.nodes (%d): each node runs tp/nodes GPUs" (int $w.tp) (int $w.nodes)) }}
{{- end }}
{{- if and (eq $w.device "cpu") (gt (int $w.nodes) 1) }}
{{- fail "workers.nodes > 1 needs workers.device=cuda: multi-node tensor parallel is a GPU setup" }}
{{- end }}
{{- if and (eq .Values.model.source "tiny") (ne $w.device "cpu") }}
{{- fail "model.source=tiny is the CPU test model: set workers.device=cpu (see presets/cpu-tiny.yaml)" }}
{{- end }}
{{- if and .Values.gateway.enabled (not .Values.gateway.discovery.enabled) (empty .Values.gateway.workerUrls) }}
{{- fail "gateway.discovery.enabled=false needs gateway.workerUrls: otherwise the gateway has no workers" }}
{{- end }}
{{- if and .Values.gateway.enabled .Values.gateway.discovery.enabled (not .Values.rbac.create) (not .Values.serviceAccount.name) }}
{{- fail "gateway discovery needs RBAC to watch pods: keep rbac.create=true, or set serviceAccount.name to an account that may get/list/watch pods" }}
{{- end }}
{{- if and .Values.workers.keda.enabled .Values.workers.pdb.enabled (lt (int .Values.workers.keda.minReplicas) 1) }}
{{- fail "workers.keda.minReplicas must be >= 1 while workers.pdb is enabled" }}
{{- end }}
{{- end }}

{{/* The Secret holding the gateway's API keys, or "" when the gateway runs without authentication. */}}
{{- define "m3serve.gateway.authSecretName" -}}
{{- if .Values.gateway.auth.existingSecret }}
{{- .Values.gateway.auth.existingSecret }}
{{- else if .Values.gateway.auth.apiKeys }}
{{- include "m3serve.gateway.fullname" . }}-auth
{{- end }}
{{- end }}
