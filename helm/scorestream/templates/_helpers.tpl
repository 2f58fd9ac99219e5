{{- define "scorestream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "scorestream.fullname" -}}
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

{{- define "scorestream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scorestream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "scorestream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "scorestream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
{{- end -}}

{{- define "scorestream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "scorestream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "scorestream.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- /* GPUs the pod needs: the highest cuda:N index in config.model.devices, plus one. */ -}}
{{- define "scorestream.gpuCount" -}}
{{- $n := 0 -}}
{{- range .Values.config.model.devices -}}
{{- if hasPrefix "cuda" . -}}
{{- $idx := 0 -}}
{{- if hasPrefix "cuda:" . -}}{{- $idx = atoi (trimPrefix "cuda:" .) -}}{{- end -}}
{{- if gt (add1 $idx) $n -}}{{- $n = add1 $idx -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{- /* Seconds in a humantime duration ("30s", "2m", "1m 30s", "500ms"), rounded up. */ -}}
{{- define "scorestream.durationSeconds" -}}
{{- $text := toString . -}}
{{- $ms := 0 -}}
{{- $units := dict "ms" 1 "msec" 1 "s" 1000 "sec" 1000 "secs" 1000 "second" 1000 "seconds" 1000 "m" 60000 "min" 60000 "mins" 60000 "minute" 60000 "minutes" 60000 "h" 3600000 "hr" 3600000 "hrs" 3600000 "hour" 3600000 "hours" 3600000 -}}
{{- $parts := regexFindAll "[0-9]+ *[a-z]+" $text -1 -}}
{{- if or (not $parts) (ne (regexReplaceAll "[0-9]+ *[a-z]+| " $text "") "") -}}
{{- fail (printf "cannot read the duration %q (write e.g. \"30s\" or \"2m\")" $text) -}}
{{- end -}}
{{- range $parts -}}
{{- $unit := regexFind "[a-z]+" . -}}
{{- if not (hasKey $units $unit) -}}{{- fail (printf "unknown unit %q in duration %q" $unit $text) -}}{{- end -}}
{{- $ms = add $ms (mul (atoi (regexFind "[0-9]+" .)) (get $units $unit)) -}}
{{- end -}}
{{- div (add $ms 999) 1000 -}}
{{- end -}}

{{- define "scorestream.shutdownSeconds" -}}
{{- include "scorestream.durationSeconds" (default "30s" .Values.config.shutdown_timeout) -}}
{{- end -}}

{{- define "scorestream.terminationGracePeriodSeconds" -}}
{{- $shutdown := include "scorestream.shutdownSeconds" . | atoi -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $shutdown .Values.terminationGraceMarginSeconds -}}
{{- else -}}
{{- $g := int .Values.terminationGracePeriodSeconds -}}
{{- if le $g $shutdown -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config.shutdown_timeout (%ds), or the kubelet kills the worker mid-shutdown" $g $shutdown) -}}
{{- end -}}
{{- $g -}}
{{- end -}}
{{- end -}}

{{- /* Mount points of the secrets. */ -}}
{{- define "scorestream.secretDir" -}}/etc/scorestream/secrets/{{ . }}{{- end -}}
{{- define "scorestream.configDir" -}}/etc/scorestream/config{{- end -}}

{{- define "scorestream.modelPath" -}}
{{- if .Values.model.subPath -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.subPath) -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{- /* Refuse secrets written into the config tree: they would land in a ConfigMap. */ -}}
{{- define "scorestream.refuseInlineSecrets" -}}
{{- $section := .section -}}
{{- range $k := list "token" "password" -}}
{{- if hasKey $.table $k -}}
{{- fail (printf "config.%s.%s: secrets are not rendered into the ConfigMap; use secrets.nats.%s (an existing Secret)" $section $k $k) -}}
{{- end -}}
{{- end -}}
{{- range $k, $_ := ($.table.options | default dict) -}}
{{- if regexMatch "(?i)password|secret|token|sasl\\.oauthbearer\\.config|ssl\\.key\\.pem|ssl_key" $k -}}
{{- fail (printf "config.%s.options.%s is a secret: use secrets.kafka.optionFiles (read from an existing Secret)" $section $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* Secrets wired into one source/sink section (file paths only, never values). */ -}}
{{- define "scorestream.sectionSecrets" -}}
{{- $t := .table -}}
{{- $s := .secrets -}}
{{- if eq (toString $t.type) "kafka" -}}
{{- if and $s.kafka.existingSecret $s.kafka.optionFiles -}}
{{- $files := deepCopy ($t.option_files | default dict) -}}
{{- range $opt, $key := $s.kafka.optionFiles -}}
{{- $_ := set $files $opt (printf "%s/%s" (include "scorestream.secretDir" "kafka") $key) -}}
{{- end -}}
{{- $_ := set $t "option_files" $files -}}
{{- end -}}
{{- if $s.kafka.tls.existingSecret -}}
{{- $opts := deepCopy ($t.options | default dict) -}}
{{- $dir := include "scorestream.secretDir" "kafka-tls" -}}
{{- if $s.kafka.tls.caKey -}}{{- $_ := set $opts "ssl.ca.location" (printf "%s/%s" $dir $s.kafka.tls.caKey) -}}{{- end -}}
{{- if $s.kafka.tls.certKey -}}{{- $_ := set $opts "ssl.certificate.location" (printf "%s/%s" $dir $s.kafka.tls.certKey) -}}{{- end -}}
{{- if $s.kafka.tls.keyKey -}}{{- $_ := set $opts "ssl.key.location" (printf "%s/%s" $dir $s.kafka.tls.keyKey) -}}{{- end -}}
{{- $_ := set $t "options" $opts -}}
{{- end -}}
{{- else if eq (toString $t.type) "nats" -}}
{{- $auth := 0 -}}
{{- range $k := list "credentials" "token" "password" -}}{{- if (get $s.nats $k).existingSecret -}}{{- $auth = add1 $auth -}}{{- end -}}{{- end -}}
{{- if or (gt $auth 1) (and $s.nats.password.existingSecret (not $t.user)) -}}
{{- fail "secrets.nats: use one of credentials, token or password (password with config.<section>.user)" -}}
{{- end -}}
{{- if $s.nats.credentials.existingSecret -}}
{{- $_ := set $t "credentials_file" (printf "%s/%s" (include "scorestream.secretDir" "nats-credentials") $s.nats.credentials.key) -}}
{{- end -}}
{{- if $s.nats.tls.existingSecret -}}
{{- $dir := include "scorestream.secretDir" "nats-tls" -}}
{{- $tls := deepCopy ($t.tls | default dict) -}}
{{- if $s.nats.tls.caKey -}}{{- $_ := set $tls "ca_file" (printf "%s/%s" $dir $s.nats.tls.caKey) -}}{{- end -}}
{{- if $s.nats.tls.certKey -}}{{- $_ := set $tls "cert_file" (printf "%s/%s" $dir $s.nats.tls.certKey) -}}{{- end -}}
{{- if $s.nats.tls.keyKey -}}{{- $_ := set $tls "key_file" (printf "%s/%s" $dir $s.nats.tls.keyKey) -}}{{- end -}}
{{- $_ := set $t "tls" $tls -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* The worker config tree: values.config plus what the chart owns. Returns YAML. */ -}}
{{- define "scorestream.configTree" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $model := deepCopy ($cfg.model | default dict) -}}
{{- $_ := set $model "path" (include "scorestream.modelPath" .) -}}
{{- $_ := set $cfg "model" $model -}}
{{- $http := deepCopy ($cfg.http | default dict) -}}
{{- $_ := set $http "listen" (printf "0.0.0.0:%d" (int .Values.service.port)) -}}
{{- $api := .Values.scoreApi -}}
{{- if $api.enabled -}}
{{- $_ := set $http "score_api" true -}}
{{- $_ := set $http "max_pending_events" (int $api.maxPendingEvents) -}}
{{- $_ := set $http "max_body_bytes" (int64 $api.maxBodyBytes) -}}
{{- if $api.token.existingSecret -}}
{{- $_ := set $http "token_file" (printf "%s/%s" (include "scorestream.secretDir" "score-api-token") $api.token.key) -}}
{{- end -}}
{{- if $api.port -}}
{{- if eq (int $api.port) (int .Values.service.port) -}}
{{- fail "scoreApi.port must differ from service.port (or be 0 to share it)" -}}
{{- end -}}
{{- $_ := set $http "api_listen" (printf "0.0.0.0:%d" (int $api.port)) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "http" $http -}}
{{- range $section := list "source" "sink" "dead_letter" -}}
{{- $t := get $cfg $section | default (deepCopy (get $.Values.placeholderSections $section)) -}}
{{- $_ := set $cfg $section $t -}}
{{- if not (kindIs "map" $t) -}}{{- fail (printf "config.%s is required (a table with a type)" $section) -}}{{- end -}}
{{- include "scorestream.refuseInlineSecrets" (dict "section" $section "table" $t) -}}
{{- include "scorestream.sectionSecrets" (dict "table" $t "secrets" $.Values.secrets) -}}
{{- end -}}
{{- range $name, $t := ($cfg.sinks | default dict) -}}
{{- if not (kindIs "map" $t) -}}{{- fail (printf "config.sinks.%s must be a table with a type" $name) -}}{{- end -}}
{{- include "scorestream.refuseInlineSecrets" (dict "section" (printf "sinks.%s" $name) "table" $t) -}}
{{- include "scorestream.sectionSecrets" (dict "table" $t "secrets" $.Values.secrets) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{- /* The Secrets mounted as files: (volume name, Secret name, mount dir). */ -}}
{{- define "scorestream.secretFileMounts" -}}
{{- $s := .Values.secrets -}}
{{- $out := list -}}
{{- if and $s.kafka.existingSecret $s.kafka.optionFiles -}}
{{- $out = append $out (dict "name" "kafka-secret" "secretName" $s.kafka.existingSecret "mountPath" (include "scorestream.secretDir" "kafka")) -}}
{{- end -}}
{{- if $s.kafka.tls.existingSecret -}}
{{- $out = append $out (dict "name" "kafka-tls" "secretName" $s.kafka.tls.existingSecret "mountPath" (include "scorestream.secretDir" "kafka-tls")) -}}
{{- end -}}
{{- if $s.nats.credentials.existingSecret -}}
{{- $out = append $out (dict "name" "nats-credentials" "secretName" $s.nats.credentials.existingSecret "mountPath" (include "scorestream.secretDir" "nats-credentials")) -}}
{{- end -}}
{{- if $s.nats.tls.existingSecret -}}
{{- $out = append $out (dict "name" "nats-tls" "secretName" $s.nats.tls.existingSecret "mountPath" (include "scorestream.secretDir" "nats-tls")) -}}
{{- end -}}
{{- if and .Values.scoreApi.enabled .Values.scoreApi.token.existingSecret -}}
{{- $out = append $out (dict "name" "score-api-token" "secretName" .Values.scoreApi.token.existingSecret "mountPath" (include "scorestream.secretDir" "score-api-token")) -}}
{{- end -}}
{{- range $s.extraMounts -}}
{{- $out = append $out (dict "name" .name "secretName" .secretName "mountPath" .mountPath) -}}
{{- end -}}
{{- toYaml (dict "mounts" $out) -}}
{{- end -}}

{{/*
The top finite bucket (seconds) of the worker's latency histograms (LATENCY_BUCKETS in
src/metrics.rs; tests/helm.rs checks they agree). A quantile past it reads as this bound, so an
alert threshold at or above it could never fire.
*/}}
{{- define "scorestream.latencyTopBucket" -}}14400{{- end -}}

{{- /*
KEDA's Kafka scaler authentication, from the same settings the worker uses (config.source.options
and secrets.kafka). Returns YAML {} when the scaler needs none (PLAINTEXT) or a
TriggerAuthentication is given (keda.kafka.authenticationRef); else {name, params (the non-secret
parameters: sasl, username, tls), refs (parameter -> Secret key: password, ca, cert, key)}.
*/}}
{{- define "scorestream.kedaKafkaAuth" -}}
{{- $k := .Values.keda -}}
{{- $s := .Values.secrets.kafka -}}
{{- $src := (include "scorestream.configTree" . | fromYaml).source -}}
{{- $opts := $src.options | default dict -}}
{{- $protocol := upper (toString (get $opts "security.protocol" | default "PLAINTEXT")) -}}
{{- $out := dict -}}
{{- if and (not $k.kafka.authenticationRef) (ne $protocol "PLAINTEXT") -}}
{{- $params := dict -}}
{{- $refs := list -}}
{{- if has $protocol (list "SSL" "SASL_SSL") -}}
{{- $_ := set $params "tls" "enable" -}}
{{- if $s.tls.existingSecret -}}
{{- range $p, $key := dict "ca" $s.tls.caKey "cert" $s.tls.certKey "key" $s.tls.keyKey -}}
{{- if $key -}}{{- $refs = append $refs (dict "parameter" $p "name" $s.tls.existingSecret "key" $key) -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if hasPrefix "SASL_" $protocol -}}
{{- $mechanism := upper (toString (get $opts "sasl.mechanism" | default "GSSAPI")) -}}
{{- $modes := dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512" -}}
{{- if not (hasKey $modes $mechanism) -}}
{{- fail (printf "keda: the chart renders KEDA's Kafka authentication for PLAIN and SCRAM only, not sasl.mechanism %s: create a TriggerAuthentication and set keda.kafka.authenticationRef" $mechanism) -}}
{{- end -}}
{{- $_ := set $params "sasl" (get $modes $mechanism) -}}
{{- $_ := set $params "username" (required "keda: config.source.options.sasl.username is required for KEDA's SASL authentication" (get $opts "sasl.username")) -}}
{{- $passwordKey := get ($s.optionFiles | default dict) "sasl.password" -}}
{{- if not (and $s.existingSecret $passwordKey) -}}
{{- fail "keda: KEDA's SASL authentication reads the password from secrets.kafka.existingSecret (optionFiles[\"sasl.password\"]); set them, or keda.kafka.authenticationRef" -}}
{{- end -}}
{{- $refs = append $refs (dict "parameter" "password" "name" $s.existingSecret "key" $passwordKey) -}}
{{- end -}}
{{- $out = dict "name" (printf "%s-kafka" (include "scorestream.fullname" .)) "params" $params "refs" $refs -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
