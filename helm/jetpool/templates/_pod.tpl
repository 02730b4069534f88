{{/*
What the api and gateway pods share with the service pods: the security contexts, the image, the config
file (rolled when it changes), probes on /health and /ready of their own port, a writable /tmp.
(dict "root" $ "name" NAME "values" .Values.api|gateway "args" LIST "env" YAML-LIST "mounts" YAML-LIST
"volumes" YAML-LIST)
*/}}
{{- define "jetpool.componentPod" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "jetpool.serviceLabels" (dict "root" $root "name" .name) | nindent 4 }}
  annotations:
    checksum/config: {{ include "jetpool.config" $root | sha256sum }}
    {{- with .values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "jetpool.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ .name }}
      image: {{ include "jetpool.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["tini", "--", "jetpool"]
      args:
        {{- toYaml .args | nindent 8 }}
      workingDir: /tmp
      ports:
        - name: http
          containerPort: {{ .values.port }}
          protocol: TCP
      env:
        {{- .env | trim | nindent 8 }}
        {{- with .values.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        httpGet:
          path: /health
          port: http
        {{- toYaml $root.Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /health
          port: http
        {{- toYaml $root.Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /ready
          port: http
        {{- toYaml $root.Values.probes.readiness | nindent 8 }}
      {{- with .values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/jetpool/config.yaml
          subPath: config.yaml
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- with .mounts | trim }}{{ . | nindent 8 }}{{ end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "jetpool.fullname" $root }}-config
    {{- include "jetpool.emptyDir" (dict "name" "tmp" "spec" $root.Values.tmpVolume) | nindent 4 }}
    {{- with .volumes | trim }}{{ . | nindent 4 }}{{ end }}
  {{- with .values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "jetpool.selectorLabels" (dict "root" $root "name" .name) | nindent 10 }}
{{- end -}}

{{/* A ClusterIP Service in front of a component's port: (dict "root" $ "name" NAME "port" PORT). */}}
{{- define "jetpool.componentService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "jetpool.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "jetpool.serviceLabels" (dict "root" .root "name" .name) | nindent 4 }}
spec:
  type: {{ .type | default "ClusterIP" }}
  selector:
    {{- include "jetpool.selectorLabels" (dict "root" .root "name" .name) | nindent 4 }}
  ports:
    - name: http
      port: {{ .port }}
      targetPort: http
      protocol: TCP
{{- end -}}
