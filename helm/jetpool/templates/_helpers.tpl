{{/* Names and labels. */}}
{{- define "jetpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "jetpool.fullname" -}}
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

{{- define "jetpool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "jetpool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: jetpool
{{- end -}}

{{/* Labels of one service's objects and pods. Call with (dict "root" $ "name" SERVICE). */}}
{{- define "jetpool.serviceLabels" -}}
{{ include "jetpool.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* Selector labels of one service's pods. Call with (dict "root" $ "name" SERVICE). */}}
{{- define "jetpool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jetpool.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "jetpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "jetpool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "jetpool.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Deep merge: keys of .over win over keys of .base, maps are merged key by key. Unlike sprig's
mergeOverwrite, a false, 0 or "" in .over does override (services.x.enabled: false must work).
Returns YAML; read it back with fromYaml.
*/}}
{{- define "jetpool.merge" -}}
{{- $out := deepCopy (.base | default dict) -}}
{{- range $key, $value := (.over | default dict) -}}
{{- $base := get $out $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $base) -}}
{{- $_ := set $out $key (include "jetpool.merge" (dict "base" $base "over" $value) | fromYaml) -}}
{{- else -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* One service's values: serviceDefaults with services.NAME merged over them. (dict "root" $ "name" NAME) */}}
{{- define "jetpool.serviceValues" -}}
{{- include "jetpool.merge" (dict "base" .root.Values.serviceDefaults "over" (get .root.Values.services .name)) -}}
{{- end -}}

{{/*
The config file every pod reads: .Values.config, with each service's `config` overrides merged into
config.services.NAME. Rendered generically, so config keys the chart does not know pass through.
*/}}
{{- define "jetpool.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $services := deepCopy ($config.services | default dict) -}}
{{- range $name, $_ := .Values.services -}}
{{- $svc := include "jetpool.serviceValues" (dict "root" $ "name" $name) | fromYaml -}}
{{- if $svc.config -}}
{{- $_ := set $services $name (include "jetpool.merge" (dict "base" (get $services $name) "over" $svc.config) | fromYaml) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $config "services" $services -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
Every enabled service, merged and with what the templates derive from it:
  fullname      name of its Deployment, Service, PDB and ScaledObject
  stream        the stream its consumer reads (config.services.NAME.stream)
  consumer      its durable consumer's name (config durable, default: the service name)
  configReplicas  the pod count the engine sizes max_ack_pending for (maxReplicas under KEDA)
  terminationGracePeriodSeconds  ceil(drain_timeout_s) + 5 + shutdownMarginSeconds
  resources     jetpool.workerResources with the service's own resources merged over them
Returns YAML: {NAME: {...}}.
*/}}
{{- define "jetpool.services" -}}
{{- $root := . -}}
{{- $config := include "jetpool.config" . | fromYaml -}}
{{- $out := dict -}}
{{- range $name, $_ := .Values.services -}}
{{- $svc := include "jetpool.serviceValues" (dict "root" $root "name" $name) | fromYaml -}}
{{- if $svc.enabled -}}
{{- $cfg := get ($config.services | default dict) $name -}}
{{- if not (and (kindIs "map" $cfg) $cfg.stream) -}}
{{- fail (printf "services.%s: config.services.%s needs at least its stream and routes (set them there or in services.%s.config)" $name $name $name) -}}
{{- end -}}
{{- $drain := $cfg.drain_timeout_s | default 20 -}}
{{- $_ := set $svc "fullname" (printf "%s-%s" (include "jetpool.fullname" $root) $name | trunc 63 | trimSuffix "-") -}}
{{- $_ := set $svc "stream" $cfg.stream -}}
{{- $_ := set $svc "consumer" ($cfg.durable | default $name) -}}
{{- $_ := set $svc "configReplicas" (ternary $svc.autoscaling.maxReplicas $svc.replicas $svc.autoscaling.enabled) -}}
{{- $_ := set $svc "terminationGracePeriodSeconds" (add (ceil $drain) 5 $root.Values.shutdownMarginSeconds) -}}
{{- $_ := set $svc "resources" (include "jetpool.merge" (dict "base" (include "jetpool.workerResources" $svc | fromYaml) "over" $svc.resources) | fromYaml) -}}
{{- $_ := set $out $name $svc -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
Where a pod's NATS credentials come from: a Secret name and the key of each credential in it
(empty: not used). A service's own natsAuth.existingSecret wins over nats.auth; inline credentials
live in the Secret the chart creates. (dict "root" $ "svc" SERVICE) -> YAML.
*/}}
{{- define "jetpool.natsAuth" -}}
{{- $auth := .root.Values.nats.auth -}}
{{- $inline := or $auth.user $auth.password $auth.token -}}
{{- if and $inline $auth.existingSecret -}}
{{- fail "nats.auth: give either existingSecret or inline credentials (user/password/token), not both" -}}
{{- end -}}
{{- if .svc.natsAuth.existingSecret -}}
{{- toYaml (dict "secret" .svc.natsAuth.existingSecret "user" .svc.natsAuth.userKey "password" .svc.natsAuth.passwordKey "token" .svc.natsAuth.tokenKey "creds" .svc.natsAuth.credsKey "nkeySeed" .svc.natsAuth.nkeySeedKey) -}}
{{- else if $auth.existingSecret -}}
{{- toYaml (dict "secret" $auth.existingSecret "user" $auth.userKey "password" $auth.passwordKey "token" $auth.tokenKey "creds" $auth.credsKey "nkeySeed" $auth.nkeySeedKey) -}}
{{- else if $inline -}}
{{- toYaml (dict "secret" (printf "%s-nats" (include "jetpool.fullname" .root)) "user" (ternary "user" "" (not (empty $auth.user))) "password" (ternary "password" "" (not (empty $auth.password))) "token" (ternary "token" "" (not (empty $auth.token))) "creds" "" "nkeySeed" "") -}}
{{- else -}}
{{- toYaml (dict "secret" "") -}}
{{- end -}}
{{- end -}}

{{/*
How a pod reaches NATS: the URL, credentials and TLS, as environment, volume mounts and volumes.
Secrets other than the user name are mounted as files, never put in the environment.
Each takes (dict "root" $ "auth" AUTH), AUTH from jetpool.natsAuth.
*/}}
{{- define "jetpool.natsEnv" -}}
{{- $tls := .root.Values.nats.tls -}}
- name: JETPOOL_NATS_URL
  value: {{ .root.Values.nats.url | quote }}
{{- if .auth.user }}
- name: JETPOOL_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ .auth.secret }}
      key: {{ .auth.user }}
{{- end }}
{{- range $key, $var := dict "password" "JETPOOL_NATS_PASSWORD_FILE" "token" "JETPOOL_NATS_TOKEN_FILE" "creds" "JETPOOL_NATS_CREDS" "nkeySeed" "JETPOOL_NATS_NKEY_SEED" }}
{{- if get $.auth $key }}
- name: {{ $var }}
  value: /etc/jetpool/nats/{{ get (include "jetpool.authFiles" $ | fromYaml) $key }}
{{- end }}
{{- end }}
{{- if $tls.existingSecret }}
{{- range $key, $var := dict "caKey" "JETPOOL_NATS_TLS_CA" "certKey" "JETPOOL_NATS_TLS_CERT" "keyKey" "JETPOOL_NATS_TLS_KEY" }}
{{- if get $tls $key }}
- name: {{ $var }}
  value: /etc/jetpool/tls/{{ get (include "jetpool.tlsFiles" $ | fromYaml) $key }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "jetpool.authFiles" -}}
{{- toYaml (dict "password" "password" "token" "token" "creds" "nats.creds" "nkeySeed" "nkey.seed") -}}
{{- end -}}

{{- define "jetpool.tlsFiles" -}}
{{- toYaml (dict "caKey" "ca.crt" "certKey" "tls.crt" "keyKey" "tls.key") -}}
{{- end -}}

{{- define "jetpool.natsMounts" -}}
{{- if or .auth.password .auth.token .auth.creds .auth.nkeySeed }}
- name: nats-auth
  mountPath: /etc/jetpool/nats
  readOnly: true
{{- end }}
{{- if .root.Values.nats.tls.existingSecret }}
- name: nats-tls
  mountPath: /etc/jetpool/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "jetpool.natsVolumes" -}}
{{- $tls := .root.Values.nats.tls -}}
{{- if or .auth.password .auth.token .auth.creds .auth.nkeySeed }}
- name: nats-auth
  secret:
    secretName: {{ .auth.secret }}
    defaultMode: 288  # 0440: readable by the pod's fsGroup, nobody else
    items:
      {{- range $key, $file := include "jetpool.authFiles" . | fromYaml }}
      {{- with get $.auth $key }}
      - key: {{ . }}
        path: {{ $file }}
      {{- end }}
      {{- end }}
{{- end }}
{{- if $tls.existingSecret }}
- name: nats-tls
  secret:
    secretName: {{ $tls.existingSecret }}
    defaultMode: 288  # 0440
    items:
      {{- range $key, $file := include "jetpool.tlsFiles" . | fromYaml }}
      {{- with get $tls $key }}
      - key: {{ . }}
        path: {{ $file }}
      {{- end }}
      {{- end }}
{{- end }}
{{- end -}}

{{/* An emptyDir volume: (dict "name" NAME "spec" (dict "medium" .. "sizeLimit" ..)). */}}
{{- define "jetpool.emptyDir" -}}
{{- $spec := dict -}}
{{- range $key := list "medium" "sizeLimit" -}}
{{- with get ($.spec | default dict) $key -}}
{{- $_ := set $spec $key . -}}
{{- end -}}
{{- end -}}
- name: {{ .name }}
  emptyDir: {{- if $spec }}{{ toYaml $spec | nindent 4 }}{{ else }} {}{{ end }}
{{- end -}}

{{/*
The config the provision Job applies: the pods' config with only the services that have a Deployment,
so no consumer is created that no pod reads.
*/}}
{{- define "jetpool.provisionConfig" -}}
{{- $config := include "jetpool.config" . | fromYaml -}}
{{- $services := dict -}}
{{- range $name, $_ := include "jetpool.services" . | fromYaml -}}
{{- $_ := set $services $name (get $config.services $name) -}}
{{- end -}}
{{- $_ := set $config "services" $services -}}
{{- toYaml $config -}}
{{- end -}}


{{/*
A service pod's resources from its worker count (serviceDefaults.perWorker): a core per worker process,
the supervisor's memory plus each worker's, a memory limit of twice that and no CPU limit.
*/}}
{{- define "jetpool.workerResources" -}}
{{- $per := .perWorker -}}
{{- $millicores := mul .workers $per.cpuMillicores -}}
{{- $memory := add $per.baseMemoryMiB (mul .workers $per.memoryMiB) -}}
requests:
  cpu: {{ if eq (mod $millicores 1000) 0 }}{{ div $millicores 1000 | quote }}{{ else }}{{ printf "%dm" $millicores }}{{ end }}
  memory: {{ printf "%dMi" $memory }}
limits:
  memory: {{ printf "%dMi" (mul 2 $memory) }}
{{- end -}}

{{/* Whether the service pods skip provisioning: the provision Job does it, or their NATS users may not. */}}
{{- define "jetpool.podsProvision" -}}
{{- if not (or .Values.provisionJob.enabled .Values.nats.auth.perService) }}true{{ end -}}
{{- end -}}

{{/* JETPOOL_SHOP_DATABASE_URL from the database Secret (an env list entry). */}}
{{- define "jetpool.databaseEnv" -}}
- name: JETPOOL_SHOP_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret must name the Secret with the shop's PostgreSQL DSN" .Values.database.existingSecret }}
      key: {{ required "database.urlKey must name the DSN's key in database.existingSecret" .Values.database.urlKey }}
{{- end -}}

{{/* The payment processor's base URL: the simulator's Service, or gateway.url. */}}
{{- define "jetpool.gatewayUrl" -}}
{{- if .Values.gateway.enabled -}}
http://{{ include "jetpool.fullname" . }}-gateway.{{ .Release.Namespace }}.svc:{{ .Values.gateway.port }}
{{- else -}}
{{- required "gateway.url must name the payment processor when gateway.enabled is false" .Values.gateway.url -}}
{{- end -}}
{{- end -}}

{{/* Name of an extra component's objects (api, gateway): (dict "root" $ "name" NAME). */}}
{{- define "jetpool.componentName" -}}
{{- printf "%s-%s" (include "jetpool.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
