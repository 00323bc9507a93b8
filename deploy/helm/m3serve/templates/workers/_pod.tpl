{{/*
The pod template of a worker. Pass (dict "ctx" $ "role" ROLE) where ROLE is
  single    one pod holds the whole replica (Deployment)
  leader    rank 0 of a LeaderWorkerSet group: serves HTTP, probed, discovered by the gateway
  follower  ranks 1.. of a group: joins the leader's torch.distributed group, serves nothing
*/}}
{{- define "m3serve.worker.podTemplate" -}}
{{- $ := .ctx }}
{{- $role := .role }}
{{- $w := $.Values.workers }}
{{- $servesHttp := ne $role "follower" }}
{{- $gpusPerPod := div (int $w.tp) (int $w.nodes) -}}
metadata:
  labels:
    {{- include "m3serve.labels" (dict "ctx" $ "component" "worker") | nindent 4 }}
    m3serve.io/serves-http: {{ $servesHttp | quote }}
    {{- with $w.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/drain-script: {{ $.Files.Get "files/drain.py" | sha256sum | trunc 16 }}
    {{- with $w.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $w.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $w.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ add (int $w.drain.drainSeconds) (int $w.drain.shutdownSeconds) }}
  {{- if ne $.Values.model.source "pvc" }}
  # Every rank loads its own shard, so followers fetch the checkpoint too (a no-op on a filled shared claim).
  initContainers:
    {{- include "m3serve.modelInitContainer" (dict "ctx" $ "include" (list)) | nindent 4 }}
  {{- end }}
  containers:
    - name: worker
      image: {{ include "m3serve.image" $ }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      command: ["m3serve", "worker"]
      args:
        - --model-path
        - {{ include "m3serve.modelPath" $ | quote }}
        - --served-model-name
        - {{ $.Values.model.name | quote }}
        - --tp
        - {{ $w.tp | quote }}
        - --host
        - 0.0.0.0
        - --port
        - {{ $w.port | quote }}
        - --device
        - {{ $w.device }}
        - --enable-metrics
        {{- if gt (int $w.nodes) 1 }}
        # Kubernetes expands $(VAR) from the env that LeaderWorkerSet injects into every pod of a group.
        - --nnodes
        - $(LWS_GROUP_SIZE)
        - --node-rank
        - $(LWS_WORKER_INDEX)
        - --dist-init-addr
        - $(LWS_LEADER_ADDRESS):{{ $w.distInitPort }}
        {{- end }}
        {{- range $w.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        {{- if eq $w.device "cpu" }}
        # The portable platform: SGLang without its CUDA kernel package (python/m3serve/platform).
        - name: SGLANG_PLATFORM
          value: m3serve_portable
        {{- end }}
        - name: HF_HOME
          value: /tmp/hf-home
        {{- with $w.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: http
          containerPort: {{ $w.port }}
          protocol: TCP
        {{- if gt (int $w.nodes) 1 }}
        - name: dist-init
          containerPort: {{ $w.distInitPort }}
          protocol: TCP
        {{- end }}
      {{- if $servesHttp }}
      startupProbe:
        httpGet: {path: {{ $w.probes.startup.path }}, port: http}
        periodSeconds: {{ $w.probes.startup.periodSeconds }}
        failureThreshold: {{ $w.probes.startup.failureThreshold }}
        timeoutSeconds: 5
      readinessProbe:
        httpGet: {path: {{ $w.probes.readiness.path }}, port: http}
        periodSeconds: {{ $w.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ $w.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ $w.probes.readiness.failureThreshold }}
      livenessProbe:
        httpGet: {path: {{ $w.probes.liveness.path }}, port: http}
        periodSeconds: {{ $w.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ $w.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ $w.probes.liveness.failureThreshold }}
      {{- end }}
      lifecycle:
        preStop:
          exec:
            # Wait for in-flight requests to finish before SIGTERM; a follower waits on its leader,
            # since the group's requests die with any of its ranks. Hooks get no $(VAR) expansion:
            # drain.py expands ${VAR} in the URL itself.
            command:
              - python
              - /etc/m3serve/drain.py
              - --metrics-url
              {{- if $servesHttp }}
              - http://127.0.0.1:{{ $w.port }}/metrics
              {{- else }}
              - http://${LWS_LEADER_ADDRESS}:{{ $w.port }}/metrics
              {{- end }}
              - --timeout
              - {{ $w.drain.drainSeconds | quote }}
              - --min-seconds
              - {{ $w.drain.minSeconds | quote }}
      resources:
        {{- $res := deepCopy $w.resources }}
        {{- if eq $w.device "cuda" }}
        {{- $limits := default dict $res.limits }}
        {{- $_ := set $limits $w.gpuResource $gpusPerPod }}
        {{- $_ := set $res "limits" $limits }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      {{- with $w.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: model
          mountPath: {{ $.Values.model.mountPath }}
          {{- if eq $.Values.model.source "pvc" }}
          readOnly: true
          {{- end }}
        - name: dshm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        - name: drain
          mountPath: /etc/m3serve
          readOnly: true
  volumes:
    {{- include "m3serve.worker.modelVolume" $ | nindent 4 }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $w.shm.sizeLimit }}
    - name: tmp
      emptyDir: {}
    - name: drain
      configMap:
        name: {{ include "m3serve.worker.fullname" $ }}-drain
{{- end }}
